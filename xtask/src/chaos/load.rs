//! The steady mixed load through the gateway.
//!
//! Open loop: a ticker starts a checkout journey (create an order, add one to three items,
//! check it out) `rate` times a second whatever the fleet is doing, so a stalled fleet piles
//! up requests the way real clients would, instead of quietly slowing the load down. A second
//! ticker sends the other endpoints (finds, stock add/subtract, add_funds, pay) at half that
//! rate, and a replenisher tops up items and users that run low, so most checkouts can pass
//! while hot items and poor users still get refused. Some journeys are refused on purpose: a
//! user who is never funded (credit), a quantity no item has (stock).
//!
//! Everything the fleet answered goes into the [`World`]; a write whose outcome stays unknown
//! is retried with its key at the end ([`Load::resolve`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{interval, sleep, MissedTickBehavior};

use super::client::{Class, Http, Reply};
use super::world::{CallKind, Checkout, Clock, Item, Journey, Target, User, World, Write};

/// The shape of the load (fixed; `--rate` scales it).
pub const ITEMS: usize = 48;
pub const USERS: usize = 96;
/// Users never funded (their checkouts are refused for credit).
pub const BROKE_USERS: usize = 4;
const START_STOCK: i64 = 200;
const START_CREDIT: i64 = 2_000;
const LOW_STOCK: i64 = 40;
const LOW_CREDIT: i64 = 300;
/// Share of journeys refused on purpose, for credit and for stock.
const BROKE_SHARE: f64 = 0.03;
const HUGE_SHARE: f64 = 0.03;
const HUGE_QUANTITY: i64 = 1_000_000;
/// Journeys out at once beyond which new ones are shed (counted): a fleet stalled for a
/// minute at 200/s would otherwise gather tens of thousands.
const MAX_JOURNEYS: usize = 6_000;
/// How often a request inside a journey (create, addItem) is retried with its key.
const RETRIES: u32 = 6;

/// The load's shared state.
pub struct Load {
    pub http: Http,
    pub clock: Clock,
    world: Mutex<World>,
    run_id: String,
    next_key: AtomicU64,
    stop: AtomicBool,
    journeys_out: AtomicUsize,
    /// Tasks spawned and not finished (counted before the spawn, so a drain cannot miss a
    /// task that has not sent its request yet).
    tasks_out: AtomicUsize,
    requests_out: AtomicUsize,
    /// Send time (ms) of the latest checkout answered 2xx: the fault schedule waits on it.
    last_ok_checkout_sent_ms: AtomicU64,
}

/// What one journey will do, drawn from the seeded generator when it starts.
#[derive(Debug, Clone)]
struct Plan {
    user: usize,
    lines: Vec<(usize, i64)>,
}

impl Load {
    pub fn new(http: Http, clock: Clock, run_id: String) -> Self {
        Load {
            http,
            clock,
            world: Mutex::new(World::default()),
            run_id,
            next_key: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            journeys_out: AtomicUsize::new(0),
            tasks_out: AtomicUsize::new(0),
            requests_out: AtomicUsize::new(0),
            last_ok_checkout_sent_ms: AtomicU64::new(0),
        }
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh idempotency key, unique across runs (the fleet keeps keys for 24 hours, so a
    /// rerun with the same seed must not replay the last run's answers).
    fn key(&self) -> String {
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        format!("chaos-{}-{n}", self.run_id)
    }

    /// True when a checkout sent at or after `t` has been answered 2xx.
    pub fn checkout_ok_since(&self, t: f64) -> bool {
        self.last_ok_checkout_sent_ms.load(Ordering::SeqCst) as f64 / 1000.0 >= t
    }

    pub fn requests_out(&self) -> usize {
        self.requests_out.load(Ordering::SeqCst)
    }

    /// One request, logged.
    async fn call(&self, kind: CallKind, path: &str, key: Option<&str>) -> (f64, f64, Reply) {
        self.requests_out.fetch_add(1, Ordering::SeqCst);
        let sent = self.clock.now();
        let reply = match key {
            Some(key) => self.http.post(path, key).await,
            None => self.http.get(path).await,
        };
        let answered = self.clock.now();
        self.requests_out.fetch_sub(1, Ordering::SeqCst);
        self.world().log(kind, sent, answered, &reply);
        (sent, answered, reply)
    }

    /// A POST retried with the same key until its outcome is known, at most `tries` times.
    async fn post_retrying(&self, kind: CallKind, path: &str, key: &str, tries: u32) -> Reply {
        let mut pause = Duration::from_millis(250);
        let mut reply = Reply::NoAnswer("not sent".into());
        for attempt in 0..tries {
            if attempt > 0 {
                sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            reply = self.call(kind, path, Some(key)).await.2;
            if reply.definite() {
                break;
            }
        }
        reply
    }

    /// Makes the items and users the load works on, before any fault. Each request is retried
    /// with its key until it has an answer, and must succeed.
    pub async fn setup(&self, rng: &mut StdRng) -> Result<()> {
        const TRIES: u32 = 20;
        for _ in 0..ITEMS {
            let price = rng.random_range(1..=10);
            let made = self
                .post_retrying(
                    CallKind::StockAdd,
                    &format!("/stock/item/create/{price}"),
                    &self.key(),
                    TRIES,
                )
                .await;
            let Some(id) = made.text("item_id") else {
                bail!("creating an item: {}", made.describe());
            };
            let added = self
                .post_retrying(
                    CallKind::StockAdd,
                    &format!("/stock/add/{id}/{START_STOCK}"),
                    &self.key(),
                    TRIES,
                )
                .await;
            if added.class() != Class::Ok {
                bail!("stocking item {id}: {}", added.describe());
            }
            self.world().items.push(Item {
                id,
                price,
                start: START_STOCK,
                estimate: START_STOCK,
                topping_up: false,
            });
        }
        for u in 0..USERS {
            let made = self
                .post_retrying(
                    CallKind::AddFunds,
                    "/payment/create_user",
                    &self.key(),
                    TRIES,
                )
                .await;
            let Some(id) = made.text("user_id") else {
                bail!("creating a user: {}", made.describe());
            };
            let broke = u < BROKE_USERS;
            let credit = if broke { 0 } else { START_CREDIT };
            if !broke {
                let funded = self
                    .post_retrying(
                        CallKind::AddFunds,
                        &format!("/payment/add_funds/{id}/{credit}"),
                        &self.key(),
                        TRIES,
                    )
                    .await;
                if funded.class() != Class::Ok {
                    bail!("funding user {id}: {}", funded.describe());
                }
            }
            self.world().users.push(User {
                id,
                start: credit,
                estimate: credit,
                topping_up: false,
                broke,
            });
        }
        // The set-up's requests are not part of the load's figures.
        self.world().calls.clear();
        Ok(())
    }

    /// Runs the load until [`Load::stop`]; returns when the tickers have stopped (requests may
    /// still be out: see [`Load::drain`]).
    pub async fn run(self: Arc<Self>, rate: f64, seed: u64) {
        let journeys = tokio::spawn(self.clone().journey_ticker(rate, seed));
        let others = tokio::spawn(self.clone().other_ticker(rate / 2.0, seed ^ 0x5eed));
        let topper = tokio::spawn(self.clone().replenisher(seed ^ 0x70b));
        let _ = tokio::join!(journeys, others, topper);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until no task of the load is left (so no request is out or about to go).
    pub async fn drain(&self) {
        while self.tasks_out.load(Ordering::SeqCst) > 0 {
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Spawns a task of the load, counted until it ends.
    fn spawn(self: &Arc<Self>, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks_out.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        tokio::spawn(async move {
            task.await;
            this.tasks_out.fetch_sub(1, Ordering::SeqCst);
        });
    }

    async fn journey_ticker(self: Arc<Self>, rate: f64, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        while !self.stopped() {
            tick.tick().await;
            let plan = self.plan(&mut rng);
            if self.journeys_out.load(Ordering::SeqCst) >= MAX_JOURNEYS {
                self.world().shed += 1;
                continue;
            }
            self.journeys_out.fetch_add(1, Ordering::SeqCst);
            let this = self.clone();
            self.spawn(async move {
                this.journey(plan).await;
                this.journeys_out.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    fn plan(&self, rng: &mut StdRng) -> Plan {
        let (n_items, n_users, broke) = {
            let w = self.world();
            (w.items.len(), w.users.len(), BROKE_USERS.min(w.users.len()))
        };
        let user = if rng.random_bool(BROKE_SHARE) || broke == n_users {
            rng.random_range(0..broke.max(1))
        } else {
            rng.random_range(broke..n_users)
        };
        let mut lines: Vec<(usize, i64)> = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            let item = skewed(rng, n_items);
            if !lines.iter().any(|(i, _)| *i == item) {
                lines.push((item, rng.random_range(1..=3)));
            }
        }
        if rng.random_bool(HUGE_SHARE) {
            lines[0].1 = HUGE_QUANTITY;
        }
        Plan { user, lines }
    }

    async fn journey(&self, plan: Plan) {
        let user_id = self.world().users[plan.user].id.clone();
        let created = self
            .post_retrying(
                CallKind::CreateOrder,
                &format!("/orders/create/{user_id}"),
                &self.key(),
                RETRIES,
            )
            .await;
        let Some(order) = created.text("order_id") else {
            self.world().creates_lost += 1;
            return;
        };
        let mut journey = Journey {
            order: order.clone(),
            user: plan.user,
            acked: Vec::new(),
            unknown: Vec::new(),
            checkout: None,
        };
        for (item, qty) in plan.lines {
            let item_id = self.world().items[item].id.clone();
            let reply = self
                .post_retrying(
                    CallKind::AddItem,
                    &format!("/orders/addItem/{order}/{item_id}/{qty}"),
                    &self.key(),
                    RETRIES,
                )
                .await;
            match reply.class() {
                Class::Ok => journey.acked.push((item, qty)),
                Class::Refused => {}
                Class::Failed | Class::NoAnswer => journey.unknown.push((item, qty)),
            }
        }
        // One attempt: a checkout without a definite answer is resolved from the order's
        // `paid` flag once the fleet is quiet, so the figures count first answers only.
        let key = self.key();
        let (sent, _, reply) = self
            .call(
                CallKind::Checkout,
                &format!("/orders/checkout/{order}"),
                Some(&key),
            )
            .await;
        let mut w = self.world();
        if reply.class() == Class::Ok {
            self.last_ok_checkout_sent_ms
                .fetch_max((sent * 1000.0) as u64, Ordering::SeqCst);
            for &(item, qty) in &journey.acked {
                w.items[item].estimate -= qty;
            }
            let total: i64 = journey
                .acked
                .iter()
                .map(|&(item, qty)| qty * w.items[item].price)
                .sum();
            w.users[journey.user].estimate -= total;
        }
        journey.checkout = Some(Checkout { key, sent, reply });
        w.journeys.push(journey);
    }

    async fn other_ticker(self: Arc<Self>, rate: f64, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        while !self.stopped() {
            tick.tick().await;
            if self.requests_out() >= MAX_JOURNEYS {
                continue;
            }
            let op = self.other_op(&mut rng);
            let this = self.clone();
            self.spawn(async move { this.other(op).await });
        }
    }

    fn other_op(&self, rng: &mut StdRng) -> Op {
        let w = self.world();
        let item = rng.random_range(0..w.items.len());
        let user = rng.random_range(BROKE_USERS.min(w.users.len() - 1)..w.users.len());
        match rng.random_range(0..100) {
            0..30 => Op::Find(
                CallKind::FindItem,
                format!("/stock/find/{}", w.items[item].id),
            ),
            30..50 => Op::Find(
                CallKind::FindUser,
                format!("/payment/find_user/{}", w.users[user].id),
            ),
            50..65 if !w.journeys.is_empty() => {
                let j = &w.journeys[rng.random_range(0..w.journeys.len())];
                Op::Find(CallKind::FindOrder, format!("/orders/find/{}", j.order))
            }
            50..75 => Op::Write(Target::Item(item), rng.random_range(1..=10)),
            75..85 => Op::Write(Target::Item(item), -rng.random_range(1..=3)),
            85..95 => Op::Write(Target::User(user), rng.random_range(1..=50)),
            _ => Op::Write(Target::User(user), -rng.random_range(1..=20)),
        }
    }

    async fn other(&self, op: Op) {
        match op {
            Op::Find(kind, path) => {
                self.call(kind, &path, None).await;
            }
            Op::Write(target, delta) => self.write(target, delta).await,
        }
    }

    /// A direct write, recorded with its key for the end-of-run resolution.
    async fn write(&self, target: Target, delta: i64) {
        let (kind, path) = {
            let w = self.world();
            match target {
                Target::Item(i) => {
                    let id = &w.items[i].id;
                    if delta >= 0 {
                        (CallKind::StockAdd, format!("/stock/add/{id}/{delta}"))
                    } else {
                        (
                            CallKind::StockSubtract,
                            format!("/stock/subtract/{id}/{}", -delta),
                        )
                    }
                }
                Target::User(u) => {
                    let id = &w.users[u].id;
                    if delta >= 0 {
                        (
                            CallKind::AddFunds,
                            format!("/payment/add_funds/{id}/{delta}"),
                        )
                    } else {
                        (CallKind::Pay, format!("/payment/pay/{id}/{}", -delta))
                    }
                }
            }
        };
        let key = self.key();
        let (sent, _, reply) = self.call(kind, &path, Some(&key)).await;
        let mut w = self.world();
        if reply.class() == Class::Ok {
            w.note_write(target, delta);
        }
        w.writes.push(Write {
            target,
            delta,
            path,
            key,
            sent,
            reply,
        });
    }

    /// Tops up items and users that run low, one add at a time per entity, at random so the
    /// hot ones still run dry now and then.
    async fn replenisher(self: Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tick = interval(Duration::from_millis(500));
        while !self.stopped() {
            tick.tick().await;
            let mut todo = Vec::new();
            {
                let mut w = self.world();
                for (i, item) in w.items.iter_mut().enumerate() {
                    if item.estimate < LOW_STOCK && !item.topping_up && rng.random_bool(0.5) {
                        item.topping_up = true;
                        todo.push((Target::Item(i), rng.random_range(100..=300)));
                    }
                }
                for (u, user) in w.users.iter_mut().enumerate() {
                    if !user.broke
                        && user.estimate < LOW_CREDIT
                        && !user.topping_up
                        && rng.random_bool(0.5)
                    {
                        user.topping_up = true;
                        todo.push((Target::User(u), rng.random_range(1_000..=3_000)));
                    }
                }
            }
            for (target, delta) in todo {
                let this = self.clone();
                self.spawn(async move {
                    this.write(target, delta).await;
                    let mut w = this.world();
                    match target {
                        Target::Item(i) => w.items[i].topping_up = false,
                        Target::User(u) => w.users[u].topping_up = false,
                    }
                });
            }
        }
    }

    /// Retries every direct write whose outcome is unknown with its own key until it has a
    /// definite answer (the first answer, replayed, or the write applied now). Returns how
    /// many stayed unknown after `tries` rounds.
    pub async fn resolve(&self, tries: u32) -> usize {
        for round in 0..tries {
            let open: Vec<(usize, String, String)> = self
                .world()
                .writes
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.reply.definite())
                .map(|(i, w)| (i, w.path.clone(), w.key.clone()))
                .collect();
            if open.is_empty() {
                return 0;
            }
            if round > 0 {
                sleep(Duration::from_secs(1)).await;
            }
            for (i, path, key) in open {
                let reply = self.http.post(&path, &key).await;
                self.world().writes[i].reply = reply;
            }
        }
        self.world()
            .writes
            .iter()
            .filter(|w| !w.reply.definite())
            .count()
    }
}

/// An item index skewed towards the low ones: a few hot items, many cold.
fn skewed(rng: &mut StdRng, n: usize) -> usize {
    let u: f64 = rng.random();
    ((u * u * n as f64) as usize).min(n - 1)
}

#[derive(Debug, Clone)]
enum Op {
    Find(CallKind, String),
    Write(Target, i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with_entities() -> Load {
        let load = Load::new(
            Http::new("http://127.0.0.1:1").unwrap(),
            Clock::start(),
            "t".into(),
        );
        {
            let mut w = load.world();
            for i in 0..ITEMS {
                w.items.push(Item {
                    id: format!("i{i}"),
                    price: 2,
                    start: 10,
                    estimate: 10,
                    topping_up: false,
                });
            }
            for u in 0..USERS {
                w.users.push(User {
                    id: format!("u{u}"),
                    start: 10,
                    estimate: 10,
                    topping_up: false,
                    broke: u < BROKE_USERS,
                });
            }
        }
        load
    }

    #[test]
    fn plans_are_seeded_and_mix_in_refusals() {
        let load = load_with_entities();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..2000).map(|_| load.plan(&mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        let b = draw(7);
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "same seed, same plans");
        let broke = a.iter().filter(|p| p.user < BROKE_USERS).count();
        let huge = a
            .iter()
            .filter(|p| p.lines.iter().any(|l| l.1 == HUGE_QUANTITY))
            .count();
        assert!((20..120).contains(&broke), "{broke} of 2000 broke");
        assert!((20..120).contains(&huge), "{huge} of 2000 huge");
        for p in &a {
            assert!((1..=3).contains(&p.lines.len()));
            let mut items: Vec<usize> = p.lines.iter().map(|l| l.0).collect();
            items.dedup();
            assert_eq!(items.len(), p.lines.len(), "distinct items per order");
        }
        // Skewed: the first quarter of the items gets about half of the lines.
        let lines: Vec<usize> = a.iter().flat_map(|p| p.lines.iter().map(|l| l.0)).collect();
        let hot = lines.iter().filter(|&&i| i < ITEMS / 4).count();
        assert!(hot * 10 > lines.len() * 4, "{hot} of {}", lines.len());
    }

    #[test]
    fn other_ops_never_fund_the_broke() {
        let load = load_with_entities();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..2000 {
            if let Op::Write(Target::User(u), _) = load.other_op(&mut rng) {
                assert!(u >= BROKE_USERS);
            }
        }
    }

    #[test]
    fn keys_are_unique() {
        let load = load_with_entities();
        assert_ne!(load.key(), load.key());
        assert!(load.key().starts_with("chaos-t-"));
    }
}
