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
//! Acknowledged means on two nodes. A store reached through Sentinel
//! ([`RedisTarget::Sentinel`]) is a master and two replicas, and whatever this
//! module returns may be acknowledged (an HTTP 2xx, a message ack, a saga
//! decision), so it must survive the master's death:
//! - after writes, `WAIT <n> <REDIS_WAIT_TIMEOUT_MS>` must report that every
//!   healthy replica has them: `n` is the number of replicas the master sees
//!   online and acknowledging (an ACK within the last second), at least one.
//!   One replica is not enough when both are up: Sentinel may promote the
//!   other one (it prefers the replica it heard from last, which need not be
//!   the one that had the write), and a write only the demoted pair held is
//!   gone (seen under chaos: a master killed, the new master falsely failed
//!   over a second later, the lagging replica promoted). A replica that is
//!   down, stalled or still syncing counts out, so one failure never makes
//!   writes wait for it;
//! - a transaction that wrote nothing ([`Tx::Abort`]: a replayed answer, a
//!   recorded outcome, "already done") returns what it read, and that may be a
//!   write whose own WAIT failed (its caller got a 503). So a marker write
//!   (`durability:mark`) on the same connection, then `WAIT`, confirms that a
//!   replica has everything the master held when it was read.
//!   [`Store::query_confirmed`] and [`Store::run_confirmed`] do the same for
//!   plain reads whose result will be acknowledged.
//!
//! When no replica confirms in time, or the master refuses the write with
//! `NOREPLICAS` (it has no replica connected: `min-replicas-to-write 1`), the
//! operation is retried like any transient failure (the retry finds the
//! recorded answer and confirms it again), and once the retry budget is spent
//! it fails with [`StoreError::NotDurable`]: an HTTP 503 with `Retry-After`, a
//! command that is not acked but retried. The write may have happened; its
//! idempotency key or dedupe record makes the retry safe. Each such event
//! counts in `redis_not_durable_total{reason="wait"|"noreplicas"}` and logs a
//! warning. There is no "carry on without a replica".
//!
//! A [`RedisTarget::Direct`] store is a single node for development and tests:
//! WAIT is skipped entirely, and nothing it acknowledges survives the loss of
//! that node.

mod planned;

pub use planned::{next_reply, Decide, Plan, Planned};

use std::future::Future;
use std::time::{Duration, Instant};

use deadpool::managed;
use deadpool_redis::{sentinel, Runtime};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// How one store is reached.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// A single Redis at a fixed URL (development, tests). Not replicated: writes are
    /// acknowledged without WAIT, and do not survive the loss of the node.
    Direct { url: String },
    /// A master found through the Sentinels, with replicas: every acknowledged write is
    /// confirmed on a replica (WAIT).
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
    /// No replica confirmed the write (or what was read) within the retry budget, or the
    /// master refused it for want of a replica (`NOREPLICAS`). It is not acknowledged: it may
    /// or may not have happened on the master, and a retry under the same idempotency key (or
    /// the redelivery of the same command) is safe and returns the first answer.
    #[error("not confirmed on a replica, outcome unknown (retry with the same key): {0}")]
    NotDurable(String),
    /// The master is out of memory (`maxmemory` with `noeviction`) and refused a write
    /// (`OOM`; inside MULTI/EXEC the whole transaction is discarded, so the refused
    /// transaction applied nothing; earlier writes of the same request may have). A read
    /// that must be confirmed is refused too (its confirmation is a marker write). Not
    /// retried within the request (memory comes back only as keys expire or an operator adds
    /// some): the caller hears a 503, and a participant's command goes round again with a
    /// backoff.
    #[error("store full: {0}; retry later")]
    Full(String),
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

/// deadpool-redis' connection managers without the `PING` they send every
/// time a connection leaves the pool: one extra round trip per store operation,
/// a fifth of all the commands a checkout sent. A connection that died while
/// pooled fails its first command instead, is discarded together with every
/// idle one ([`Store::discard`]), and the operation is retried like any other
/// connection failure (every operation here retries those); a connection idle
/// for longer than [`IDLE_BEFORE_PING`] is still pinged, so a long-idle pool
/// finds its dead connections before use.
struct Lean<M>(M);

/// How long a pooled connection may sit unused before it is pinged when taken.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(5);

impl<M> managed::Manager for Lean<M>
where
    M: managed::Manager<Type = MultiplexedConnection, Error = RedisError>,
{
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.0.create().await
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        metrics: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        if metrics.last_used() < IDLE_BEFORE_PING {
            return Ok(());
        }
        self.0.recycle(conn, metrics).await
    }
}

enum Pool {
    Direct(managed::Pool<Lean<deadpool_redis::Manager>>),
    Sentinel(managed::Pool<Lean<sentinel::Manager>>),
}

/// A pooled connection to the current master, used by one task at a time.
///
/// A connection dropped in the middle of an exchange that leaves state on it
/// (a WATCH not ended yet, a WAIT not answered, a stretched reply timeout) is
/// closed, not returned to the pool: a timeout drops the future that owns it,
/// and a later user's EXEC would otherwise fail (or, for a plain write, be
/// lost without an error) on a key someone watched long ago.
pub struct Conn {
    /// Always `Some` until the connection is closed or dropped.
    pooled: Option<Pooled>,
    /// A `WATCH` not sent yet: it goes out in front of the next command, in the
    /// same write, so a transaction's WATCH costs no round trip of its own.
    watch: Option<Cmd>,
    /// In the middle of an exchange that leaves state on the connection.
    unsettled: bool,
}

enum Pooled {
    Direct(managed::Object<Lean<deadpool_redis::Manager>>),
    Sentinel(managed::Object<Lean<sentinel::Manager>>),
}

impl Conn {
    fn new(pooled: Pooled) -> Self {
        Conn {
            pooled: Some(pooled),
            watch: None,
            unsettled: false,
        }
    }

    fn inner(&mut self) -> &mut MultiplexedConnection {
        match self.pooled.as_mut().expect("a live connection") {
            Pooled::Direct(c) => c,
            Pooled::Sentinel(c) => c,
        }
    }

    /// `WATCH keys`, sent with the next command (the watch starts before that
    /// command runs, exactly as if it had been sent alone first).
    fn watch(&mut self, keys: &[String]) {
        let mut watch = redis::cmd("WATCH");
        watch.arg(keys);
        self.watch = Some(watch);
        self.unsettled = true;
    }

    /// An exchange that leaves state on the connection begins (see [`Conn`]).
    fn unsettle(&mut self) {
        self.unsettled = true;
    }

    /// The exchange ended cleanly: the connection may go back to the pool.
    fn settle(&mut self) {
        self.unsettled = false;
    }

    /// How long the client waits for the next reply on this connection.
    fn set_reply_timeout(&mut self, timeout: Duration) {
        self.inner().set_response_timeout(timeout);
    }

    /// Drops the connection for good instead of returning it to the pool.
    fn discard(mut self) {
        self.unsettled = true;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.unsettled {
            return; // back to the pool
        }
        match self.pooled.take() {
            Some(Pooled::Direct(c)) => drop(managed::Object::take(c)),
            Some(Pooled::Sentinel(c)) => drop(managed::Object::take(c)),
            None => {}
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Some(watch) = self.watch.take() else {
            return self.inner().req_packed_command(cmd);
        };
        Box::pin(async move {
            let mut both = redis::pipe();
            both.add_command(watch).add_command(cmd.clone());
            let mut replies = self.inner().req_packed_commands(&both, 1, 1).await?;
            replies
                .pop()
                .ok_or_else(|| RedisError::from((redis::ErrorKind::Client, "no reply after WATCH")))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Some(watch) = self.watch.take() else {
            return self.inner().req_packed_commands(cmd, offset, count);
        };
        Box::pin(async move {
            if cmd.is_transaction() {
                // WATCH is not allowed inside MULTI: it goes first, alone.
                watch.query_async::<()>(self.inner()).await?;
                return self.inner().req_packed_commands(cmd, offset, count).await;
            }
            let mut all = redis::pipe();
            all.add_command(watch);
            for c in cmd.cmd_iter() {
                all.add_command(c.clone());
            }
            self.inner()
                .req_packed_commands(&all, offset + 1, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        match self.pooled.as_ref() {
            Some(Pooled::Direct(c)) => c.get_db(),
            Some(Pooled::Sentinel(c)) => c.get_db(),
            None => 0,
        }
    }
}

/// What the body of a [`Store::transact`] decided after reading the watched keys.
pub enum Tx<T> {
    /// Apply these writes atomically (they are sent inside MULTI/EXEC), confirm them on a
    /// replica, then return the value.
    Commit(Pipeline, T),
    /// Write nothing and return the value (a replayed answer, a refusal, nothing to do). What
    /// was read is confirmed on a replica first, since the value may acknowledge it.
    Abort(T),
}

/// One Redis store (a Sentinel master set, or a single Redis).
pub struct Store {
    pool: Pool,
    target: RedisTarget,
    wait_timeout: Duration,
    /// How long an operation keeps retrying through connection errors (a failover takes ~2-3 s)
    /// and writes no replica confirmed.
    retry_budget: Duration,
    /// How many replicas a write must reach (see the module comment), and when
    /// the master was last asked.
    healthy_replicas: std::sync::Mutex<Option<(Instant, i64)>>,
}

/// How long the count of healthy replicas is trusted before the master is asked again.
const REPLICA_COUNT_TTL: Duration = Duration::from_millis(250);
/// A replica whose last ACK is older than this (seconds, as INFO reports it) counts out.
const MAX_REPLICA_LAG_SECS: i64 = 1;

/// Written (with a short expiry) to confirm a read: see the module comment.
const MARK_KEY: &str = "durability:mark";
const MARK_TTL_MS: u64 = 60_000;

/// The marker write (see [`MARK_KEY`]).
fn mark_write() -> Cmd {
    let mut mark = redis::cmd("SET");
    mark.arg(MARK_KEY).arg(1).arg("PX").arg(MARK_TTL_MS);
    mark
}

/// Records written per pipeline by [`Store::write_batch`] (`batch_init` of 100k: 100 round trips).
pub const BATCH_CHUNK: i64 = 1000;
/// Chunks of a [`Store::write_batch`] in flight at once.
pub const BATCH_IN_FLIGHT: usize = 4;
/// How long an operation retries by default: a failover takes ~2-3 s.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(15);
/// Connections per store and process: enough for every in-flight transaction.
const POOL_SIZE: usize = 64;
/// A single command that takes longer than this is treated as a broken connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the client waits for a reply: redis-rs' default, which every pooled connection
/// has, and which a request ending in WAIT gets back once WAIT has answered.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// A WAIT's reply may take its timeout plus this: Redis, not the client, must be the one
/// that gives up on the replicas (WAIT 1 500 under a 500 ms reply timeout raced it).
const WAIT_REPLY_MARGIN: Duration = Duration::from_millis(1000);

impl Store {
    /// Builds the pool. Connecting is lazy: nothing is contacted yet.
    pub fn new(target: &RedisTarget, wait_timeout: Duration) -> Result<Self, StoreError> {
        let pool_config = managed::PoolConfig {
            max_size: POOL_SIZE,
            timeouts: managed::Timeouts {
                wait: Some(Duration::from_secs(5)),
                create: Some(Duration::from_secs(2)),
                recycle: Some(Duration::from_secs(2)),
            },
            ..Default::default()
        };
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
        let pool = match target {
            RedisTarget::Direct { url } => {
                let manager =
                    deadpool_redis::Manager::new(url.as_str()).map_err(|e| unavailable(&e))?;
                Pool::Direct(
                    managed::Pool::builder(Lean(manager))
                        .config(pool_config)
                        .runtime(Runtime::Tokio1)
                        .build()
                        .map_err(|e| unavailable(&e))?,
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
                let manager = sentinel::Manager::new(
                    urls,
                    master_name.clone(),
                    Some(node),
                    sentinel::SentinelServerType::Master,
                )
                .map_err(|e| unavailable(&e))?;
                Pool::Sentinel(
                    managed::Pool::builder(Lean(manager))
                        .config(pool_config)
                        .runtime(Runtime::Tokio1)
                        .build()
                        .map_err(|e| unavailable(&e))?,
                )
            }
        };
        Ok(Self {
            pool,
            target: target.clone(),
            wait_timeout,
            retry_budget: DEFAULT_RETRY_BUDGET,
            healthy_replicas: std::sync::Mutex::new(None),
        })
    }

    /// Changes how long an operation keeps retrying before it fails with
    /// [`StoreError::Unavailable`] or [`StoreError::NotDurable`] (default
    /// [`DEFAULT_RETRY_BUDGET`]). An operation fails at most one try (bounded by
    /// the command timeout, a few seconds) after its budget is spent.
    pub fn with_retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// True for a Sentinel-managed (replicated) store, where acknowledged writes need WAIT.
    pub fn replicated(&self) -> bool {
        matches!(self.target, RedisTarget::Sentinel { .. })
    }

    async fn connection(&self) -> Result<Conn, String> {
        match &self.pool {
            Pool::Direct(p) => p.get().await.map(Pooled::Direct),
            Pool::Sentinel(p) => p.get().await.map(Pooled::Sentinel),
        }
        .map(Conn::new)
        .map_err(|e| e.to_string())
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
        let answered = matches!(pong, Ok(Ok(_)));
        if !answered {
            self.discard(conn);
        }
        answered
    }

    /// Throws away a connection that failed, and every idle one with it. The
    /// pool does not ping what it hands out ([`Lean`]), and what broke one
    /// connection (a failover kills every client of the old master, a link
    /// that went down) has usually broken the idle ones too: without this,
    /// each would fail one operation's try before it was found out.
    fn discard(&self, conn: Conn) {
        conn.discard();
        match &self.pool {
            Pool::Direct(p) => drop(p.retain(|_, _| false)),
            Pool::Sentinel(p) => drop(p.retain(|_, _| false)),
        }
    }

    /// A master connection, waiting (within `retry`'s budget) while the store
    /// cannot give one: the first step of every retry loop here.
    async fn connection_within(&self, retry: &mut Retry<'_>) -> Result<Conn, StoreError> {
        loop {
            match self.connection().await {
                Ok(conn) => return Ok(conn),
                Err(e) => retry.after(Transient::Unavailable(e)).await?,
            }
        }
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
    /// Nothing is confirmed on a replica: for reads that need no confirmation and
    /// writes nobody is told about (leases); see [`Store::run_confirmed`].
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<T, RedisError>)>,
    {
        self.run_checked(|conn| {
            let ran = op(conn);
            async move {
                let (conn, result) = ran.await;
                (conn, result.map_err(StoreError::Redis))
            }
        })
        .await
    }

    /// As [`Store::run`], for a read whose result may be acknowledged (a
    /// recorded answer replayed, a paid order): when `acknowledged(&value)`,
    /// what was read is confirmed on a replica on the same connection before it
    /// is returned, as if it had just been written.
    pub async fn run_confirmed<T, F, Fut>(
        &self,
        acknowledged: impl Fn(&T) -> bool,
        mut op: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<T, RedisError>)>,
    {
        let acknowledged = &acknowledged;
        self.run_checked(|conn| {
            let ran = op(conn);
            async move {
                let (mut conn, result) = ran.await;
                let value = match result {
                    Ok(value) => value,
                    Err(e) => return (conn, Err(StoreError::Redis(e))),
                };
                if acknowledged(&value) {
                    if let Err(e) = self.confirm_read(&mut conn).await {
                        return (conn, Err(e));
                    }
                }
                (conn, Ok(value))
            }
        })
        .await
    }

    /// Sends `cmd` and returns its typed reply as [`Store::run_confirmed`] does:
    /// confirmed on a replica first when `acknowledged(&reply)`.
    pub async fn query_confirmed<T: redis::FromRedisValue>(
        &self,
        cmd: &Cmd,
        acknowledged: impl Fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        self.run_confirmed(acknowledged, |mut conn| async move {
            let result = cmd.query_async::<T>(&mut conn).await;
            (conn, result)
        })
        .await
    }

    /// The retry loop of [`Store::run`] and friends: `op`'s transient failures
    /// (connection, failover, no replica confirmed) are tried again until the
    /// budget is spent.
    async fn run_checked<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<T, StoreError>)>,
    {
        let mut retry = self.retry();
        loop {
            let conn = self.connection_within(&mut retry).await?;
            match tokio::time::timeout(COMMAND_TIMEOUT, op(conn)).await {
                Ok((_conn, Ok(value))) => return Ok(value),
                Ok((conn, Err(e))) => {
                    // The connection may hold a WATCH or half a reply: do not reuse it.
                    self.discard(conn);
                    retry.after(self.transient(e)?).await?;
                }
                // The timed-out future owned the connection: dropping it returned it to the
                // pool if it held no state, closed it otherwise (see `Conn`).
                Err(_) => {
                    retry
                        .after(Transient::Unavailable("command timed out".into()))
                        .await?
                }
            }
        }
    }

    /// An optimistic transaction: `WATCH keys`, let `body` read and decide,
    /// then `MULTI`/`EXEC` its writes; a concurrent writer makes EXEC return nil
    /// and the whole thing runs again. Committed writes are confirmed on a
    /// replica (WAIT), and so is what an aborted one read.
    ///
    /// `body` gets the watched connection by value and gives it back with its decision.
    pub async fn transact<T, F, Fut>(&self, keys: &[String], mut body: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<Tx<T>, StoreError>)>,
    {
        let mut retry = self.retry();
        loop {
            let conn = self.connection_within(&mut retry).await?;
            let attempt = self.attempt(conn, keys, &mut body);
            match tokio::time::timeout(COMMAND_TIMEOUT * 2, attempt).await {
                Ok(Ok(Some(value))) => return Ok(value),
                Ok(Ok(None)) => {
                    metrics::counter!("redis_watch_conflicts_total").increment(1);
                    tokio::task::yield_now().await;
                }
                Ok(Err(e)) => retry.after(self.transient(e)?).await?,
                Err(_) => {
                    retry
                        .after(Transient::Unavailable("transaction timed out".into()))
                        .await?
                }
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
            conn.watch(keys);
        }
        let (mut conn, decision) = body(conn).await;
        let outcome = async {
            match decision {
                Err(e) => {
                    redis::cmd("UNWATCH")
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(StoreError::Redis)?;
                    Err(e)
                }
                Ok(Tx::Abort(value)) => {
                    // Nothing written, but the value may acknowledge what was read.
                    self.confirm_read(&mut conn).await?;
                    Ok(Some(value))
                }
                Ok(Tx::Commit(writes, value)) => {
                    if !self.exec_confirmed(&mut conn, &writes).await? {
                        return Ok(None);
                    }
                    Ok(Some(value))
                }
            }
        }
        .await;
        if outcome.is_err() {
            self.discard(conn);
        }
        outcome
    }

    /// Writes that need no read first (creation, batch loads): sent as one
    /// atomic pipeline, retried through failovers while its outcome is unknown
    /// (the callers' writes are overwrites, so sending them again is safe as
    /// long as nobody else wrote the same keys meanwhile), then confirmed on a
    /// replica once.
    ///
    /// Once EXEC has answered, the writes are never sent again: by the time a
    /// failed WAIT could be retried, a later transaction may have built on them
    /// (a `take` on a freshly loaded counter), and a second copy would undo it.
    /// An unconfirmed write is [`StoreError::NotDurable`] at once; the caller's
    /// client retries the whole request.
    pub async fn write(&self, writes: &Pipeline) -> Result<(), StoreError> {
        let mut retry = self.retry();
        loop {
            let mut conn = self.connection_within(&mut retry).await?;
            let mut atomic = writes.clone();
            let sent = tokio::time::timeout(
                COMMAND_TIMEOUT,
                atomic.atomic().query_async::<()>(&mut conn),
            )
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.discard(conn);
                    retry.after(self.transient(StoreError::Redis(e))?).await?;
                    continue;
                }
                Err(_) => {
                    self.discard(conn);
                    retry
                        .after(Transient::Unavailable("command timed out".into()))
                        .await?;
                    continue;
                }
            }
            let confirm_budget = self.wait_timeout + WAIT_REPLY_MARGIN;
            return match tokio::time::timeout(confirm_budget, self.wait_for_replica(&mut conn))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(StoreError::NotDurable(why))) => {
                    self.discard(conn);
                    Err(StoreError::NotDurable(why))
                }
                Ok(Err(e)) => {
                    self.discard(conn);
                    Err(StoreError::NotDurable(format!(
                        "applied, then WAIT failed: {e}"
                    )))
                }
                Err(_) => {
                    self.discard(conn);
                    Err(StoreError::NotDurable(
                        "applied, then WAIT timed out".into(),
                    ))
                }
            };
        }
    }

    /// Writes `n` records in pipelines of [`BATCH_CHUNK`]; `fill` adds the writes of the
    /// records in a range (one command for many, where the records allow it).
    /// Each chunk is atomic and confirmed on a replica. [`BATCH_IN_FLIGHT`] chunks are sent
    /// at once, each on a connection of its own, so encoding, the network, the master and
    /// the replicas all work at the same time. A failure stops the rest; chunks already
    /// sent may stand (the callers overwrite, so the client's retry writes them again).
    pub async fn write_batch(
        &self,
        n: i64,
        mut fill: impl FnMut(&mut Pipeline, std::ops::Range<i64>),
    ) -> Result<(), StoreError> {
        use futures::{StreamExt, TryStreamExt};
        let chunks: Vec<Pipeline> = (0..n)
            .step_by(BATCH_CHUNK as usize)
            .map(|start| {
                let mut writes = redis::pipe();
                fill(&mut writes, start..(start + BATCH_CHUNK).min(n));
                writes
            })
            .collect();
        // Owned chunks: a closure over borrowed ones is not `Send` for every lifetime.
        futures::stream::iter(chunks)
            .map(|writes| async move { self.write(&writes).await })
            .buffer_unordered(BATCH_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Sends `cmd` and returns its typed reply, retried through failovers (reads, idempotent
    /// writes). Nothing is confirmed on a replica: see [`Store::query_confirmed`].
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.run(|mut conn| async move {
            let result = cmd.query_async::<T>(&mut conn).await;
            (conn, result)
        })
        .await
    }

    /// `MULTI`, `writes`, `EXEC` and, on a replicated store, `WAIT` in one round
    /// trip: false when EXEC found a watched key changed (nothing written; the
    /// WAIT then only waits for this connection's earlier writes, which is
    /// harmless). WAIT is queued behind EXEC on the same connection, so it
    /// waits for the replication offset EXEC reached, exactly as a WAIT sent
    /// after EXEC's reply would; sending it at once saves the round trip.
    async fn exec_confirmed(&self, conn: &mut Conn, writes: &Pipeline) -> Result<bool, StoreError> {
        conn.unsettle();
        let mut commands = redis::pipe();
        commands.cmd("MULTI").ignore();
        for cmd in writes.cmd_iter() {
            commands.add_command(cmd.clone()).ignore();
        }
        if !self.replicated() {
            commands.cmd("EXEC");
            let (done,): (Value,) = commands
                .query_async(conn)
                .await
                .map_err(StoreError::Redis)?;
            conn.settle();
            return Ok(done != Value::Nil);
        }
        // The marker makes EXEC replicate something even when every write is a no-op
        // (a SREM of a member already gone is not propagated), so that WAIT waits for an
        // offset past everything the transaction read, as it does after `confirm_read`'s.
        commands.add_command(mark_write()).ignore();
        commands.cmd("EXEC");
        let (mut replies, acked, needed) = self.send_with_wait(conn, &mut commands).await?;
        if replies.pop() == Some(Value::Nil) {
            conn.settle();
            return Ok(false);
        }
        self.replicas_confirmed(conn, acked, needed).await?;
        conn.settle();
        Ok(true)
    }

    /// `WAIT <n> <timeout>` after writes on `conn`: Ok once every healthy
    /// replica has them (at once on a [`RedisTarget::Direct`] store); see the
    /// module comment.
    async fn wait_for_replica(&self, conn: &mut Conn) -> Result<(), StoreError> {
        if !self.replicated() {
            return Ok(());
        }
        conn.unsettle();
        let (_, acked, needed) = self.send_with_wait(conn, &mut redis::pipe()).await?;
        self.replicas_confirmed(conn, acked, needed).await?;
        conn.settle();
        Ok(())
    }

    /// Sends `commands` with `WAIT <n> <timeout>` behind them, `n` being every
    /// healthy replica, under the longer reply timeout a WAIT needs. Returns the
    /// replies before WAIT's, how many replicas confirmed, and how many were needed
    /// (for [`Store::replicas_confirmed`]).
    async fn send_with_wait(
        &self,
        conn: &mut Conn,
        commands: &mut Pipeline,
    ) -> Result<(Vec<Value>, i64, i64), StoreError> {
        let needed = self.replicas_to_confirm(conn, false).await?;
        commands.cmd("WAIT").arg(needed).arg(self.wait_ms());
        conn.set_reply_timeout(self.wait_timeout + WAIT_REPLY_MARGIN);
        let mut replies: Vec<Value> = commands
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        conn.set_reply_timeout(REPLY_TIMEOUT);
        match replies.pop() {
            Some(Value::Int(acked)) => Ok((replies, acked, needed)),
            other => Err(StoreError::Redis(RedisError::from((
                redis::ErrorKind::Client,
                "WAIT did not answer a number",
                format!("{other:?}"),
            )))),
        }
    }

    /// How many replicas a write must reach: those the master sees online
    /// with an ACK in the last second, at least one. Asked of the master
    /// (`INFO replication`, on `conn`) at most every [`REPLICA_COUNT_TTL`],
    /// or now when `fresh`.
    async fn replicas_to_confirm(&self, conn: &mut Conn, fresh: bool) -> Result<i64, StoreError> {
        let cached = *self
            .healthy_replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let (false, Some((asked, n))) = (fresh, cached) {
            if asked.elapsed() < REPLICA_COUNT_TTL {
                return Ok(n);
            }
        }
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        let n = healthy_replicas(&info).max(1);
        *self
            .healthy_replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), n));
        Ok(n)
    }

    /// Ends any WATCH on `conn`, and on a replicated store makes sure a replica
    /// holds everything the master held when `conn` read: a marker write puts
    /// this connection's replication offset past all of it, and WAIT waits for
    /// that offset. One round trip (two when the replica count is due).
    async fn confirm_read(&self, conn: &mut Conn) -> Result<(), StoreError> {
        conn.unsettle();
        let mut commands = redis::pipe();
        commands.cmd("UNWATCH").ignore();
        if !self.replicated() {
            commands
                .query_async::<()>(conn)
                .await
                .map_err(StoreError::Redis)?;
            conn.settle();
            return Ok(());
        }
        commands.add_command(mark_write()).ignore();
        let (_, acked, needed) = self.send_with_wait(conn, &mut commands).await?;
        self.replicas_confirmed(conn, acked, needed).await?;
        conn.settle();
        Ok(())
    }

    fn wait_ms(&self) -> u64 {
        self.wait_timeout.as_millis() as u64
    }

    /// Judges WAIT's answer: the number of replicas that confirmed, of the
    /// `needed`. Fewer may still do when a replica went down or stalled
    /// meanwhile: the master is asked again, and what every replica healthy
    /// now has (at least one) is enough.
    async fn replicas_confirmed(
        &self,
        conn: &mut Conn,
        replicas: i64,
        needed: i64,
    ) -> Result<(), StoreError> {
        if replicas >= needed {
            return Ok(());
        }
        if replicas >= 1 && replicas >= self.replicas_to_confirm(conn, true).await? {
            return Ok(());
        }
        metrics::counter!("redis_not_durable_total", "reason" => "wait").increment(1);
        tracing::warn!(
            store = %self.target,
            wait_ms = self.wait_ms(),
            "no replica confirmed a write in time; it is not acknowledged"
        );
        Err(StoreError::NotDurable(format!(
            "no replica confirmed within {} ms",
            self.wait_ms()
        )))
    }

    /// What a failed try means for the retry loop: try again (transient), or
    /// give up now with the error.
    fn transient(&self, e: StoreError) -> Result<Transient, StoreError> {
        match e {
            StoreError::Redis(e) if is_noreplicas(&e) => {
                metrics::counter!("redis_not_durable_total", "reason" => "noreplicas").increment(1);
                tracing::warn!(store = %self.target, "the master refused a write: no replica is connected");
                Ok(Transient::NotDurable(e.to_string()))
            }
            // Before the retryable errors: a transaction OOM discarded is an `EXECABORT`.
            StoreError::Redis(e) if is_oom(&e) => {
                metrics::counter!("redis_full_total").increment(1);
                tracing::error!(store = %self.target, "the master is out of memory and refused a write");
                Err(StoreError::Full(format!(
                    "{}: out of memory (maxmemory)",
                    self.target
                )))
            }
            StoreError::Redis(e) if is_retryable(&e) => Ok(Transient::Unavailable(e.to_string())),
            StoreError::NotDurable(why) => Ok(Transient::NotDurable(why)),
            other => Err(other),
        }
    }
}

/// The replicas an `INFO replication` reply shows online and acknowledging
/// (`slaveN:ip=…,port=…,state=online,offset=…,lag=0`).
fn healthy_replicas(info: &str) -> i64 {
    info.lines()
        .filter(|line| line.starts_with("slave") && line.contains(':'))
        .filter(|line| {
            let field = |name: &str| {
                line.split([':', ','])
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            };
            field("state") == Some("online")
                && field("lag")
                    .and_then(|lag| lag.trim().parse::<i64>().ok())
                    .is_some_and(|lag| lag <= MAX_REPLICA_LAG_SECS)
        })
        .count() as i64
}

/// A failure the next try may not meet again.
enum Transient {
    /// The master was not reachable, or not the master any more.
    Unavailable(String),
    /// No replica confirmed, or the master had none to write with.
    NotDurable(String),
}

/// Backoff and budget of one operation's retries through connection failures.
struct Retry<'a> {
    store: &'a Store,
    started: Instant,
    backoff: Duration,
}

impl Retry<'_> {
    /// Sleeps before the next try, or gives up once the budget is spent: with
    /// [`StoreError::NotDurable`] if the last try failed for want of a replica,
    /// else [`StoreError::Unavailable`].
    async fn after(&mut self, failure: Transient) -> Result<(), StoreError> {
        let target = &self.store.target;
        if self.started.elapsed() >= self.store.retry_budget {
            return Err(match failure {
                Transient::Unavailable(error) => {
                    StoreError::Unavailable(format!("{target}: {error}"))
                }
                Transient::NotDurable(error) => {
                    StoreError::NotDurable(format!("{target}: {error}"))
                }
            });
        }
        metrics::counter!("redis_retries_total").increment(1);
        if let Transient::Unavailable(error) = &failure {
            // A missing replica was logged where it was seen.
            tracing::warn!(store = %target, %error, "redis operation failed, retrying");
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

/// The master refused a write because no replica is connected
/// (`min-replicas-to-write`); inside MULTI/EXEC it surfaces as `EXECABORT`
/// naming the refused command.
fn is_noreplicas(e: &RedisError) -> bool {
    refused_with(e, "NOREPLICAS")
}

/// Redis answered `code`, alone or for one of the commands of a discarded transaction.
fn refused_with(e: &RedisError, code: &str) -> bool {
    e.code() == Some(code)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, s)| s.code() == code))
}

/// The master refused a write for want of memory (`maxmemory`, `noeviction`): `OOM`
/// alone, among the failures of a transaction discarded at queue time, or as the reason of
/// an `EXECABORT` (memory ran out between queueing and `EXEC`).
fn is_oom(e: &RedisError) -> bool {
    refused_with(e, "OOM")
        || (e.code() == Some("EXECABORT") && e.detail().is_some_and(|d| d.contains("OOM")))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An error reply as Redis sends it, as redis-rs hands it over.
    fn server_error(reply: &str) -> RedisError {
        redis::parse_redis_value(reply.as_bytes())
            .and_then(Value::extract_error)
            .expect_err("an error reply")
    }

    #[test]
    fn out_of_memory_is_told_from_other_refusals() {
        let oom = server_error("-OOM command not allowed when used memory > 'maxmemory'.\r\n");
        assert!(is_oom(&oom));
        // Memory ran out between MULTI's queueing and EXEC.
        let at_exec = server_error(
            "-EXECABORT Transaction discarded because of: OOM command not allowed when used memory > 'maxmemory'.\r\n",
        );
        assert!(is_oom(&at_exec));
        let other_abort =
            server_error("-EXECABORT Transaction discarded because of previous errors.\r\n");
        assert!(!is_oom(&other_abort));
        assert!(is_retryable(&other_abort));
        let noreplicas = server_error("-NOREPLICAS Not enough good replicas to write.\r\n");
        assert!(!is_oom(&noreplicas));
    }

    #[test]
    fn only_online_replicas_that_acknowledged_lately_count() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
            min_slaves_good_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=6411,state=online,offset=3195244,lag=0\r\n\
            slave1:ip=127.0.0.1,port=6421,state=online,offset=3159268,lag=1\r\n\
            slave2:ip=127.0.0.1,port=6401,state=wait_bgsave,offset=0,lag=0\r\n\
            master_failover_state:no-failover\r\n";
        assert_eq!(healthy_replicas(info), 2);
        let stalled = "slave0:ip=127.0.0.1,port=6411,state=online,offset=1,lag=4\r\n\
            slave1:ip=127.0.0.1,port=6421,state=online,offset=1,lag=0\r\n";
        assert_eq!(healthy_replicas(stalled), 1);
        assert_eq!(healthy_replicas("role:master\r\nconnected_slaves:0\r\n"), 0);
    }

    /// Connections the pool holds right now (idle ones).
    fn pooled(store: &Store) -> usize {
        match &store.pool {
            Pool::Direct(p) => p.status().size,
            Pool::Sentinel(p) => p.status().size,
        }
    }

    /// A connection dropped between its WATCH and the end of its transaction (a timed-out
    /// try) is closed; one dropped after a settled exchange goes back to the pool.
    #[tokio::test]
    async fn a_connection_dropped_mid_transaction_is_closed_not_pooled() {
        let dir = xtask::ScratchDir::new("conn-drop-test").unwrap();
        let redis = xtask::RedisServer::start(dir.path(), xtask::free_port(), None, None).unwrap();
        let target = RedisTarget::Direct { url: redis.url() };
        let store = Store::new(&target, Duration::from_millis(10)).unwrap();

        let mut conn = store.connection().await.unwrap();
        let _: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut conn)
            .await
            .unwrap();
        drop(conn);
        assert_eq!(
            pooled(&store),
            1,
            "a settled connection goes back to the pool"
        );

        let mut conn = store.connection().await.unwrap();
        conn.watch(&["k".to_string()]);
        let _: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut conn)
            .await
            .unwrap();
        drop(conn); // as a timeout drops the try that owns it
        assert_eq!(
            pooled(&store),
            0,
            "a watching connection went back to the pool"
        );

        let mut conn = store.connection().await.unwrap();
        conn.watch(&["k".to_string()]);
        store.confirm_read(&mut conn).await.unwrap();
        drop(conn);
        assert_eq!(
            pooled(&store),
            1,
            "a transaction that ended goes back to the pool"
        );
    }
}
