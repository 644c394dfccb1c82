//! The scenarios: what data each one sets up, what it sends, and what its rows say.
//!
//! - `fresh`: distinct batch-initialised orders that all succeed (ample stock and credit),
//!   each checked out exactly once ([`super::ids::Ids`]).
//! - `refused`: the same, but half of the users have no credit, so about half the checkouts
//!   are refused by payment after stock was reserved: the compensation (release) runs.
//! - `hot`: the course benchmark's consistency scenario, timed: one item with stock 100, 1000
//!   users with credit 1, 1000 one-unit orders, all checked out at once; exactly 100 must
//!   succeed and the stock must end at 0, or the run fails.
//! - `mixed`: the locust mix of the stress test (checkout 10 : find order 3 : find item 2 :
//!   find user 2), checkouts on fresh orders, reads on random batch ids.
//! - `init`: the three `batch_init` calls for 100k entities, timed, three rounds one after
//!   another and one round all at once.
//! - `memory`: growth of `used_memory` on the store masters per 100k items, users, orders
//!   (new ids past the ones that exist) and finished checkouts.
//!
//! Set-up is never inside a measured window; the CPU snapshots bracket only the load.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::cpu::{self, Usage};
use super::engine::{self, Client, Method, Req, Source, Window};
use super::ids::{orders_needed, Extent, Ids};
use super::memory;
use super::report::{MemRow, Row};
use super::stats::{total, Class, Tallies};
use crate::state::State;

/// The batch data set: as the course's stress test sizes it.
pub const ITEMS: u64 = 100_000;
pub const USERS: u64 = 100_000;
const PRICE: u64 = 1;
const STOCK: u64 = 1_000_000;
const CREDIT: u64 = 1_000_000;
/// A closed loop gets enough fresh orders for this many checkouts a second (well above the
/// targets), at least [`MIN_ORDERS`].
const CLOSED_CEILING: f64 = 6_000.0;
const MIN_ORDERS: u64 = 100_000;
/// The consistency scenario's shape.
const HOT_ORDERS: usize = 1_000;
const HOT_STOCK: u64 = 100;
/// Concurrency of set-up calls (create, add funds, addItem).
const SETUP_CONCURRENCY: usize = 64;
/// Entities per `init` call and per memory figure.
const BATCH: u64 = 100_000;
const INIT_ROUNDS: usize = 3;
/// Pause after a load, so compensations and settling of one scenario do not run into the next.
const QUIET: Duration = Duration::from_secs(2);

/// How a load is driven.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed(usize),
    Open(f64),
}

impl Mode {
    pub fn label(&self) -> String {
        match self {
            Mode::Closed(c) => format!("closed {c} conn"),
            Mode::Open(r) => format!("open {r}/s"),
        }
    }

    fn rate(&self) -> Option<f64> {
        match self {
            Mode::Closed(_) => None,
            Mode::Open(r) => Some(*r),
        }
    }
}

/// What every scenario needs.
pub struct Ctx {
    pub client: Client,
    pub duration: Duration,
    pub max_in_flight: usize,
    pub memory_checkouts: u64,
    /// The repository root when the gateway is the local fleet's: its state file names the
    /// processes for the CPU figures and the stores for the memory figures.
    pub fleet_root: Option<std::path::PathBuf>,
}

impl Ctx {
    /// The state file as it is now (the supervisor rewrites it when it restarts a process).
    fn state(&self) -> Option<State> {
        State::load(self.fleet_root.as_deref()?).ok().flatten()
    }

    /// `batch_init` (or any set-up POST) that must succeed; prints how long it took.
    async fn setup_call(&self, path: &str) -> Result<f64> {
        let t = Instant::now();
        self.client.must(Method::Post, path).await?;
        let s = t.elapsed().as_secs_f64();
        println!("  set-up: POST {path} in {s:.2} s");
        Ok(s)
    }

    /// Items and users for checkouts, `orders` fresh orders `0..orders`, and `funded` of the
    /// users with credit (the others have none).
    async fn batch_data(&self, orders: u64, funded: u64) -> Result<()> {
        self.setup_call(&format!("/stock/batch_init/{ITEMS}/{STOCK}/{PRICE}"))
            .await?;
        if funded < USERS {
            self.setup_call(&format!("/payment/batch_init/{USERS}/0"))
                .await?;
        }
        self.setup_call(&format!("/payment/batch_init/{funded}/{CREDIT}"))
            .await?;
        self.setup_call(&format!(
            "/orders/batch_init/{orders}/{ITEMS}/{USERS}/{PRICE}"
        ))
        .await?;
        Ok(())
    }

    /// Runs `load` between two CPU snapshots.
    async fn measured<F: Future<Output = Window>>(&self, load: F) -> (Window, Vec<Usage>) {
        let before = cpu::snapshot(self.state().as_ref());
        let window = load.await;
        let after = cpu::snapshot(self.state().as_ref());
        let usage = if self.fleet_root.is_some() {
            cpu::usage(&before, &after)
        } else {
            Vec::new()
        };
        (window, usage)
    }

    async fn drive(&self, name: &str, mode: Mode, source: Source) -> (Window, Vec<Usage>) {
        let client = &self.client;
        match mode {
            Mode::Closed(c) => {
                self.measured(engine::closed(client, source, c, self.duration, name))
                    .await
            }
            Mode::Open(r) => {
                self.measured(engine::open(
                    client,
                    source,
                    r,
                    self.duration,
                    self.max_in_flight,
                    name,
                ))
                .await
            }
        }
    }
}

/// The rows of one window: one row when it sent one kind of request, else an `all` row (with
/// the CPU figures) and one per kind.
pub fn rows_of(
    scenario: &str,
    mode: &str,
    w: &Window,
    cpu: Vec<Usage>,
    mut notes: Vec<String>,
) -> Vec<Row> {
    let checkouts = w.tallies.get("checkout").map_or(0, |t| t.count());
    if w.unsent > 0 {
        notes.push(format!(
            "{} requests fell due but were never sent: every slot stayed busy to the end \
             (they are not in the percentiles)",
            w.unsent
        ));
    }
    let row = |label: &str, summary, cpu, notes| Row {
        scenario: scenario.to_string(),
        mode: mode.to_string(),
        label: label.to_string(),
        summary,
        rate_applies: true,
        checkouts,
        cpu,
        notes,
    };
    if w.tallies.len() == 1 {
        let (label, t) = w.tallies.iter().next().expect("one tally");
        return vec![row(label, t.summary(w.seconds), cpu, notes)];
    }
    let mut rows = vec![row("all", total(&w.tallies).summary(w.seconds), cpu, notes)];
    for (label, t) in &w.tallies {
        rows.push(row(label, t.summary(w.seconds), Vec::new(), Vec::new()));
    }
    rows
}

fn checkout_source(ids: Arc<Ids>) -> Source {
    Arc::new(move || {
        ids.take()
            .map(|i| Req::post("checkout", format!("/orders/checkout/{i}")))
    })
}

fn exhausted_note(w: &Window, orders: u64) -> Vec<String> {
    if w.exhausted {
        vec![format!(
            "used up all {orders} fresh orders after {:.1} s (never reusing one): the window \
             is shorter than --duration",
            w.seconds
        )]
    } else {
        Vec::new()
    }
}

/// `fresh` (every user funded) or `refused` (half of them).
pub async fn checkouts(ctx: &Ctx, name: &str, mode: Mode, refused: bool) -> Result<Vec<Row>> {
    let orders = orders_needed(
        ctx.duration.as_secs_f64(),
        mode.rate(),
        CLOSED_CEILING,
        MIN_ORDERS,
    );
    let funded = if refused { USERS / 2 } else { USERS };
    ctx.batch_data(orders, funded).await?;
    let ids = Arc::new(Ids::new(0, orders));
    let (w, cpu) = ctx.drive(name, mode, checkout_source(ids)).await;
    let mut notes = exhausted_note(&w, orders);
    if let Some(t) = w.tallies.get("checkout") {
        if refused {
            notes.push(format!(
                "{:.0} % refused (users {funded}..{USERS} have no credit)",
                t.refused as f64 * 100.0 / t.count().max(1) as f64
            ));
        } else if t.refused > 0 {
            notes.push(format!(
                "{} checkouts refused although stock and credit were ample",
                t.refused
            ));
        }
    }
    tokio::time::sleep(QUIET).await;
    Ok(rows_of(name, &mode.label(), &w, cpu, notes))
}

/// The stress test's mix: checkouts of fresh orders, reads of random batch ids.
pub async fn mixed(ctx: &Ctx, mode: Mode) -> Result<Vec<Row>> {
    let orders = orders_needed(
        ctx.duration.as_secs_f64(),
        mode.rate(),
        CLOSED_CEILING,
        MIN_ORDERS,
    );
    ctx.batch_data(orders, USERS).await?;
    let ids = Arc::new(Ids::new(0, orders));
    let source: Source = Arc::new(move || {
        Some(match rand::random_range(0..17u32) {
            0..=9 => {
                return ids
                    .take()
                    .map(|i| Req::post("checkout", format!("/orders/checkout/{i}")))
            }
            10..=12 => Req::get(
                "find order",
                format!("/orders/find/{}", rand::random_range(0..orders)),
            ),
            13..=14 => Req::get(
                "find item",
                format!("/stock/find/{}", rand::random_range(0..ITEMS)),
            ),
            _ => Req::get(
                "find user",
                format!("/payment/find_user/{}", rand::random_range(0..USERS)),
            ),
        })
    });
    let (w, cpu) = ctx.drive("mixed", mode, source).await;
    let notes = exhausted_note(&w, orders);
    tokio::time::sleep(QUIET).await;
    Ok(rows_of("mixed", &mode.label(), &w, cpu, notes))
}

/// Runs `f(0..n)` with at most `limit` at once; the results in order.
async fn parallel<T, F, Fut>(n: usize, limit: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let slot = slots.clone().acquire_owned().await?;
        let fut = f(i);
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(slot);
            r
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

fn text(body: &Value, field: &str) -> Result<String> {
    body.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("no {field} in {body}"))
}

/// The consistency scenario, timed. Appends to `failures` when the count is not exact.
pub async fn hot(ctx: &Ctx, failures: &mut Vec<String>) -> Result<Vec<Row>> {
    let c = &ctx.client;
    let t = Instant::now();
    let item = text(
        &c.must(Method::Post, "/stock/item/create/1").await?,
        "item_id",
    )?;
    c.must(Method::Post, &format!("/stock/add/{item}/{HOT_STOCK}"))
        .await?;
    let users = Arc::new(
        parallel(HOT_ORDERS, SETUP_CONCURRENCY, |_| {
            let c = c.clone();
            async move {
                let u = text(
                    &c.must(Method::Post, "/payment/create_user").await?,
                    "user_id",
                )?;
                c.must(Method::Post, &format!("/payment/add_funds/{u}/1"))
                    .await?;
                Ok(u)
            }
        })
        .await?,
    );
    let orders = parallel(HOT_ORDERS, SETUP_CONCURRENCY, |i| {
        let (c, users, item) = (c.clone(), users.clone(), item.clone());
        async move {
            let path = format!("/orders/create/{}", users[i]);
            let o = text(&c.must(Method::Post, &path).await?, "order_id")?;
            c.must(Method::Post, &format!("/orders/addItem/{o}/{item}/1"))
                .await?;
            Ok(o)
        }
    })
    .await?;
    println!(
        "  set-up: 1 item (stock {HOT_STOCK}), {HOT_ORDERS} users (credit 1), {HOT_ORDERS} orders in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let reqs = orders
        .iter()
        .map(|o| Req::post("checkout", format!("/orders/checkout/{o}")))
        .collect();
    let (w, cpu) = ctx.measured(engine::burst(c, reqs)).await;
    let (_, after) = c.call(Method::Get, &format!("/stock/find/{item}")).await?;
    let left = after.get("stock").and_then(Value::as_i64);
    let t = &w.tallies["checkout"];
    let exact = t.ok == HOT_STOCK
        && t.refused == HOT_ORDERS as u64 - HOT_STOCK
        && t.failed == 0
        && t.errors == 0
        && left == Some(0);
    let mut notes = vec![format!(
        "{HOT_ORDERS} checkouts at once took {:.3} s (target < 0.5 s); {} succeeded \
         ({HOT_STOCK} expected), stock left {}",
        w.seconds,
        t.ok,
        left.map_or("unknown".into(), |l| l.to_string())
    )];
    if !exact {
        let f = format!(
            "hot: {} 2xx / {} 4xx / {} 5xx / {} errors, stock left {left:?}: expected exactly \
             {HOT_STOCK} successes and stock 0",
            t.ok, t.refused, t.failed, t.errors
        );
        notes.push(f.clone());
        failures.push(f);
    }
    tokio::time::sleep(QUIET).await;
    Ok(rows_of(
        "hot",
        &format!("burst {HOT_ORDERS}"),
        &w,
        cpu,
        notes,
    ))
}

/// The label of one round of the three calls, one after another.
const SEQUENCE: &str = "all three, one after another";

/// The three batch_init calls of the stress test's set-up.
fn init_calls() -> [(&'static str, String); 3] {
    [
        (
            "stock batch_init 100k",
            format!("/stock/batch_init/{BATCH}/{STOCK}/{PRICE}"),
        ),
        (
            "payment batch_init 100k",
            format!("/payment/batch_init/{BATCH}/{CREDIT}"),
        ),
        (
            "orders batch_init 100k",
            format!("/orders/batch_init/{BATCH}/{ITEMS}/{USERS}/{PRICE}"),
        ),
    ]
}

async fn timed_call(c: &Client, path: &str) -> (Duration, Class) {
    let t = Instant::now();
    let class = match c.call(Method::Post, path).await {
        Ok((status, _)) => Class::of_status(status),
        Err(_) => Class::Error,
    };
    (t.elapsed(), class)
}

fn worst(classes: &[Class]) -> Class {
    for bad in [Class::Error, Class::Failed, Class::Refused] {
        if classes.contains(&bad) {
            return bad;
        }
    }
    Class::Ok
}

/// `batch_init` of 100k items, users and orders: rounds one call after another, then one
/// round with the three at once.
pub async fn init(ctx: &Ctx) -> Result<Vec<Row>> {
    let c = &ctx.client;
    let (w, cpu) = ctx
        .measured(async {
            let start = Instant::now();
            let mut tallies = Tallies::new();
            for _ in 0..INIT_ROUNDS {
                let round = Instant::now();
                let mut classes = Vec::new();
                for (label, path) in init_calls() {
                    let (latency, class) = timed_call(c, &path).await;
                    tallies.entry(label).or_default().record(latency, class);
                    classes.push(class);
                }
                tallies
                    .entry(SEQUENCE)
                    .or_default()
                    .record(round.elapsed(), worst(&classes));
            }
            let [a, b, o] = init_calls();
            let round = Instant::now();
            let (ra, rb, ro) = tokio::join!(
                timed_call(c, &a.1),
                timed_call(c, &b.1),
                timed_call(c, &o.1)
            );
            tallies
                .entry("all three at once")
                .or_default()
                .record(round.elapsed(), worst(&[ra.1, rb.1, ro.1]));
            Window {
                tallies,
                seconds: start.elapsed().as_secs_f64(),
                exhausted: false,
                unsent: 0,
            }
        })
        .await;
    let mut rows = rows_of(
        "init",
        &format!("{INIT_ROUNDS}+1 rounds"),
        &w,
        cpu,
        vec!["target: the three 100k batch_init calls under 0.5 s".into()],
    );
    // Percentiles over different calls mean nothing: the CPU and the notes of the window go
    // to the row of the whole sequence instead of an `all` row.
    let all = rows.remove(0);
    for r in &mut rows {
        r.rate_applies = false;
        if r.label == SEQUENCE {
            r.cpu = all.cpu.clone();
            r.notes = all.notes.clone();
        }
    }
    rows.sort_by_key(|r| r.label != SEQUENCE);
    Ok(rows)
}

/// How many batch ids `0..n` exist behind a `find` path (`/stock/find/`).
async fn extent(c: &Client, find: &str) -> Result<u64> {
    let mut e = Extent::new();
    while let Some(id) = e.probe() {
        let (status, body) = c.call(Method::Get, &format!("{find}{id}")).await?;
        match status {
            200 => e.answer(id, true),
            404 => e.answer(id, false),
            other => bail!("GET {find}{id}: {other} {body}"),
        }
    }
    Ok(e.count())
}

/// A batch-initialised kind: (what, its store, its `find` path, its `batch_init` path for n).
type BatchKind = (&'static str, &'static str, &'static str, fn(u64) -> String);

/// Memory per 100k items, users, orders and finished checkouts. Needs the local fleet.
pub async fn memory(ctx: &Ctx) -> Result<(Vec<MemRow>, Vec<Row>)> {
    let Some(state) = ctx.state() else {
        println!("  memory: skipped (no state file of the fleet behind this gateway)");
        return Ok((Vec::new(), Vec::new()));
    };
    let c = &ctx.client;
    let settle = || tokio::time::sleep(Duration::from_secs(1));
    let batches: [BatchKind; 3] = [
        ("items", "stock", "/stock/find/", |n| {
            format!("/stock/batch_init/{n}/{STOCK}/{PRICE}")
        }),
        ("users", "payment", "/payment/find_user/", |n| {
            format!("/payment/batch_init/{n}/{CREDIT}")
        }),
        ("orders", "order", "/orders/find/", |n| {
            format!("/orders/batch_init/{n}/{ITEMS}/{USERS}/{PRICE}")
        }),
    ];
    let mut mem = Vec::new();
    for (what, store, find, init) in batches {
        // New ids only: batch_init overwrites 0..n-1, so grow past what exists.
        let existing = extent(c, find).await?;
        settle().await;
        let before = memory::used_memory(&state, store)?;
        ctx.setup_call(&init(existing + BATCH)).await?;
        settle().await;
        let after = memory::used_memory(&state, store)?;
        let delta = after as i64 - before as i64;
        println!("  memory: {BATCH} new {what} ({existing} existed): {delta} bytes on the {store} master");
        mem.push(MemRow {
            what: what.into(),
            store: store.into(),
            measured: BATCH,
            delta_bytes: delta,
            bytes_per_100k: delta,
        });
    }

    // Finished checkouts: fresh orders (their keys exist already), checked out once each.
    let k = ctx.memory_checkouts;
    ctx.setup_call(&format!("/orders/batch_init/{k}/{ITEMS}/{USERS}/{PRICE}"))
        .await?;
    tokio::time::sleep(QUIET).await;
    let before = memory::all_stores(&state)?;
    let ids = Arc::new(Ids::new(0, k));
    let connections = 64;
    let (w, cpu) = ctx
        .measured(engine::closed(
            c,
            checkout_source(ids),
            connections,
            Duration::from_secs(3600),
            "memory checkouts",
        ))
        .await;
    // Settling (saga finished, stock and payment records) goes on briefly after the answer.
    tokio::time::sleep(QUIET * 2).await;
    let after = memory::all_stores(&state)?;
    let done = w.tallies.get("checkout").map_or(0, |t| t.ok);
    let mut sum = 0;
    for ((store, b), (_, a)) in before.iter().zip(&after) {
        let delta = *a as i64 - *b as i64;
        sum += delta;
        mem.push(MemRow {
            what: "finished checkouts".into(),
            store: store.to_string(),
            measured: done,
            delta_bytes: delta,
            bytes_per_100k: memory::scaled(delta, done, BATCH),
        });
    }
    mem.push(MemRow {
        what: "finished checkouts".into(),
        store: "all four".into(),
        measured: done,
        delta_bytes: sum,
        bytes_per_100k: memory::scaled(sum, done, BATCH),
    });
    let rows = rows_of(
        "memory",
        &format!("closed {connections} conn, {k} orders"),
        &w,
        cpu,
        vec![format!(
            "the checkouts behind the 'finished checkouts' memory rows ({done} succeeded)"
        )],
    );
    Ok((mem, rows))
}
