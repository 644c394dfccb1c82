//! The final checks, once the fleet is quiet: the stores must agree exactly with what the load
//! was told.
//!
//! - per item: final stock = start + acknowledged adds − acknowledged subtracts − what the
//!   paid orders hold of it; per user: final credit = start + funds − pays − the paid orders'
//!   totals. Direct writes are known exactly (unknown outcomes were retried with their keys);
//!   an order is paid or not by its own `paid` flag, which is what a checkout without a
//!   definite answer is judged by;
//! - every order answered 2xx is paid, every order answered 4xx (or never checked out) is not;
//!   an order holds every acknowledged addItem and nothing that was never sent; its total is
//!   the sum of its lines at the (fixed) prices;
//! - nothing is negative.
//!
//! "No saga unfinished" and "every process back" are checked by the caller (they need the
//! fleet, not the world).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;

use super::client::{Class, Reply};
use super::load::Load;
use super::world::{Target, World};

/// An order as `find` shows it at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub paid: bool,
    pub user: String,
    /// Item id → summed quantity.
    pub items: BTreeMap<String, i64>,
    pub total: i64,
}

/// What the stores hold at the end: stock and credit by the world's indices, orders by
/// journey.
#[derive(Debug, Clone, Default)]
pub struct Finals {
    pub stock: Vec<std::result::Result<i64, String>>,
    pub credit: Vec<std::result::Result<i64, String>>,
    pub orders: Vec<std::result::Result<OrderView, String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub what: String,
    /// When the request it is about was sent, to file it under a fault; None: the whole run.
    pub at: Option<f64>,
}

fn violation(at: Option<f64>, what: String) -> Violation {
    Violation { what, at }
}

pub fn check(world: &World, finals: &Finals) -> Vec<Violation> {
    let mut out = Vec::new();
    let item_of: HashMap<&str, usize> = world
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.id.as_str(), i))
        .collect();
    // What the paid orders took, per item and per user.
    let mut taken_stock = vec![0i64; world.items.len()];
    let mut taken_credit = vec![0i64; world.users.len()];
    for (j, view) in world.journeys.iter().zip(&finals.orders) {
        let at = j.checkout.as_ref().map(|c| c.sent);
        let o = &j.order;
        let view = match view {
            Ok(v) => v,
            Err(e) => {
                out.push(violation(at, format!("order {o} cannot be read: {e}")));
                continue;
            }
        };
        let user = &world.users[j.user];
        if view.user != user.id {
            out.push(violation(
                at,
                format!("order {o} belongs to {}, made for {}", view.user, user.id),
            ));
        }
        // Lines: every acknowledged addItem, nothing never sent.
        let mut acked: BTreeMap<usize, i64> = BTreeMap::new();
        let mut maybe: BTreeMap<usize, i64> = BTreeMap::new();
        for &(i, q) in &j.acked {
            *acked.entry(i).or_default() += q;
        }
        for &(i, q) in &j.unknown {
            *maybe.entry(i).or_default() += q;
        }
        let mut total = 0i64;
        let mut lines_ok = true;
        for (id, &qty) in &view.items {
            let Some(&i) = item_of.get(id.as_str()) else {
                out.push(violation(at, format!("order {o} holds unknown item {id}")));
                lines_ok = false;
                continue;
            };
            total += qty * world.items[i].price;
            let lo = acked.get(&i).copied().unwrap_or(0);
            let hi = lo + maybe.get(&i).copied().unwrap_or(0);
            if qty < lo || qty > hi {
                out.push(violation(
                    at,
                    format!("order {o} holds {qty} of item {id}; acknowledged {lo}, sent {hi}"),
                ));
                lines_ok = false;
            }
        }
        for (&i, &lo) in &acked {
            if !view.items.contains_key(&world.items[i].id) {
                out.push(violation(
                    at,
                    format!(
                        "order {o} lacks item {}; {lo} acknowledged",
                        world.items[i].id
                    ),
                ));
                lines_ok = false;
            }
        }
        if lines_ok && total != view.total {
            out.push(violation(
                at,
                format!(
                    "order {o}: total_cost {} but its lines cost {total}",
                    view.total
                ),
            ));
        }
        // Paid exactly when the checkout said so.
        match (&j.checkout, view.paid) {
            (Some(c), paid) if c.reply.class() == Class::Ok && !paid => out.push(violation(
                at,
                format!(
                    "order {o}: checkout (key {}) answered 2xx, order not paid",
                    c.key
                ),
            )),
            (Some(c), paid) if c.reply.class() == Class::Refused && paid => out.push(violation(
                at,
                format!(
                    "order {o}: checkout (key {}) answered {}, order paid",
                    c.key,
                    c.reply.describe()
                ),
            )),
            (None, true) => out.push(violation(at, format!("order {o}: never checked out, paid"))),
            _ => {}
        }
        if view.paid {
            for (id, &qty) in &view.items {
                if let Some(&i) = item_of.get(id.as_str()) {
                    taken_stock[i] += qty;
                }
            }
            taken_credit[j.user] += view.total;
        }
    }
    // Conservation, with the direct writes; a write still unknown widens the range (and is
    // a violation of its own).
    let mut stock_range: Vec<(i64, i64)> = world.items.iter().map(|i| (i.start, i.start)).collect();
    let mut credit_range: Vec<(i64, i64)> =
        world.users.iter().map(|u| (u.start, u.start)).collect();
    for w in &world.writes {
        let range = match w.target {
            Target::Item(i) => &mut stock_range[i],
            Target::User(u) => &mut credit_range[u],
        };
        match w.reply.class() {
            Class::Ok => {
                range.0 += w.delta;
                range.1 += w.delta;
            }
            Class::Refused => {}
            Class::Failed | Class::NoAnswer => {
                if w.delta < 0 {
                    range.0 += w.delta;
                } else {
                    range.1 += w.delta;
                }
                out.push(violation(
                    Some(w.sent),
                    format!(
                        "POST {} (key {}): outcome still unknown: {}",
                        w.path,
                        w.key,
                        w.reply.describe()
                    ),
                ));
            }
        }
    }
    let mut conserve = |what: &str,
                        id: &str,
                        fin: &std::result::Result<i64, String>,
                        range: (i64, i64),
                        taken: i64| {
        let (lo, hi) = (range.0 - taken, range.1 - taken);
        match fin {
            Err(e) => out.push(violation(None, format!("{what} {id} cannot be read: {e}"))),
            Ok(v) if *v < 0 => out.push(violation(None, format!("{what} {id} is negative: {v}"))),
            Ok(v) if *v < lo || *v > hi => {
                let expected = if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}..={hi}")
                };
                out.push(violation(
                    None,
                    format!(
                        "{what} {id}: {v}, expected {expected} (start and acknowledged writes {}, paid orders took {taken})",
                        if range.0 == range.1 { range.0.to_string() } else { format!("{}..={}", range.0, range.1) }
                    ),
                ));
            }
            Ok(_) => {}
        }
    };
    for (i, item) in world.items.iter().enumerate() {
        conserve(
            "stock of item",
            &item.id,
            &finals.stock[i],
            stock_range[i],
            taken_stock[i],
        );
    }
    for (u, user) in world.users.iter().enumerate() {
        conserve(
            "credit of user",
            &user.id,
            &finals.credit[u],
            credit_range[u],
            taken_credit[u],
        );
    }
    out
}

fn order_view(reply: &Reply) -> std::result::Result<OrderView, String> {
    let bad = || format!("unexpected answer {}", reply.describe());
    if reply.status() != Some(200) {
        return Err(bad());
    }
    let body = reply.body().ok_or_else(bad)?;
    let mut items = BTreeMap::new();
    for line in body
        .get("items")
        .and_then(|v| v.as_array())
        .ok_or_else(bad)?
    {
        let id = line.get(0).and_then(|v| v.as_str()).ok_or_else(bad)?;
        let qty = line.get(1).and_then(|v| v.as_i64()).ok_or_else(bad)?;
        *items.entry(id.to_string()).or_default() += qty;
    }
    Ok(OrderView {
        paid: body.get("paid").and_then(|v| v.as_bool()).ok_or_else(bad)?,
        user: reply.text("user_id").ok_or_else(bad)?,
        items,
        total: reply.int("total_cost").ok_or_else(bad)?,
    })
}

/// GETs every path (at most 32 at once), each retried a few times until it answers 200 or
/// a 4xx; in order.
async fn read_all(load: &Arc<Load>, paths: Vec<String>) -> Vec<Reply> {
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::with_capacity(paths.len());
    for path in paths {
        let (load, gate) = (load.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let mut reply = Reply::NoAnswer("not sent".into());
            for attempt in 0..10 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                reply = load.http.get(&path).await;
                if reply.definite() {
                    break;
                }
            }
            reply
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Reply::NoAnswer(e.to_string())));
    }
    out
}

fn counter(reply: &Reply, field: &str) -> std::result::Result<i64, String> {
    match (reply.status(), reply.int(field)) {
        (Some(200), Some(v)) => Ok(v),
        _ => Err(format!("unexpected answer {}", reply.describe())),
    }
}

/// Reads every item, user and order through the gateway. Stock and credit are read until two
/// reads in a row agree (at most `settle`), so nothing still moving is judged.
pub async fn read_finals(load: &Arc<Load>, settle: Duration) -> Finals {
    let (item_paths, user_paths, order_paths) = {
        let w = load.world();
        (
            w.items
                .iter()
                .map(|i| format!("/stock/find/{}", i.id))
                .collect::<Vec<_>>(),
            w.users
                .iter()
                .map(|u| format!("/payment/find_user/{}", u.id))
                .collect::<Vec<_>>(),
            w.journeys
                .iter()
                .map(|j| format!("/orders/find/{}", j.order))
                .collect::<Vec<_>>(),
        )
    };
    let snapshot = || async {
        let stock: Vec<_> = read_all(load, item_paths.clone())
            .await
            .iter()
            .map(|r| counter(r, "stock"))
            .collect();
        let credit: Vec<_> = read_all(load, user_paths.clone())
            .await
            .iter()
            .map(|r| counter(r, "credit"))
            .collect();
        (stock, credit)
    };
    let deadline = tokio::time::Instant::now() + settle;
    let mut last = snapshot().await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshot().await;
        let same = now == last;
        last = now;
        if same || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    let orders = read_all(load, order_paths)
        .await
        .iter()
        .map(order_view)
        .collect();
    Finals {
        stock: last.0,
        credit: last.1,
        orders,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::world::{Checkout, Item, Journey, User, Write};
    use serde_json::json;

    /// Two items (price 2 and 5), two users; one paid order of 3 × item a and 1 × item b
    /// for user x; one refused order; an add of 10 to item b and an unknown pay resolved 2xx.
    fn world() -> (World, Finals) {
        let mut w = World::default();
        for (id, price) in [("a", 2), ("b", 5)] {
            w.items.push(Item {
                id: id.into(),
                price,
                start: 100,
                estimate: 0,
                topping_up: false,
            });
        }
        for id in ["x", "y"] {
            w.users.push(User {
                id: id.into(),
                start: 1000,
                estimate: 0,
                topping_up: false,
                broke: false,
            });
        }
        let checkout = |status: u16| {
            Some(Checkout {
                key: "k".into(),
                sent: 5.0,
                reply: Reply::Status(status, json!({})),
            })
        };
        w.journeys.push(Journey {
            order: "o1".into(),
            user: 0,
            acked: vec![(0, 3)],
            unknown: vec![(1, 1)],
            checkout: checkout(200),
        });
        w.journeys.push(Journey {
            order: "o2".into(),
            user: 1,
            acked: vec![(0, 1_000_000)],
            unknown: vec![],
            checkout: checkout(400),
        });
        w.writes.push(Write {
            target: Target::Item(1),
            delta: 10,
            path: "/stock/add/b/10".into(),
            key: "w1".into(),
            sent: 1.0,
            reply: Reply::Status(200, json!({})),
        });
        w.writes.push(Write {
            target: Target::User(1),
            delta: -7,
            path: "/payment/pay/y/7".into(),
            key: "w2".into(),
            sent: 1.0,
            reply: Reply::Status(200, json!({})),
        });
        let view = |paid, user: &str, items: &[(&str, i64)], total| {
            Ok(OrderView {
                paid,
                user: user.into(),
                items: items.iter().map(|(i, q)| (i.to_string(), *q)).collect(),
                total,
            })
        };
        let finals = Finals {
            stock: vec![Ok(97), Ok(109)],
            credit: vec![Ok(989), Ok(993)],
            orders: vec![
                view(true, "x", &[("a", 3), ("b", 1)], 11),
                view(false, "y", &[("a", 1_000_000)], 2_000_000),
            ],
        };
        (w, finals)
    }

    #[test]
    fn a_consistent_world_passes() {
        let (w, f) = world();
        assert_eq!(check(&w, &f), vec![]);
    }

    #[test]
    fn a_lost_unit_of_stock_is_found() {
        let (w, mut f) = world();
        f.stock[0] = Ok(96);
        let v = check(&w, &f);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].what.starts_with("stock of item a: 96, expected 97"),
            "{v:?}"
        );
    }

    #[test]
    fn a_double_charge_is_found() {
        let (w, mut f) = world();
        f.credit[0] = Ok(978);
        let v = check(&w, &f);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].what.contains("credit of user x: 978, expected 989"));
    }

    #[test]
    fn paid_flags_must_match_the_answers() {
        let (w, mut f) = world();
        // The refused order shows paid: a violation, and its take breaks conservation too.
        if let Ok(o) = &mut f.orders[1] {
            o.paid = true;
        }
        let v = check(&w, &f);
        assert!(v
            .iter()
            .any(|v| v.what.contains("order o2: checkout (key k) answered 400")));
        assert_eq!(
            v.iter().find(|v| v.what.contains("o2")).unwrap().at,
            Some(5.0)
        );
        let (w, mut f) = world();
        if let Ok(o) = &mut f.orders[0] {
            o.paid = false;
        }
        let v = check(&w, &f);
        assert!(v
            .iter()
            .any(|v| v.what == "order o1: checkout (key k) answered 2xx, order not paid"));
    }

    #[test]
    fn unknown_checkouts_are_judged_by_the_paid_flag() {
        let (mut w, f) = world();
        w.journeys[0].checkout.as_mut().unwrap().reply = Reply::NoAnswer("reset".into());
        assert_eq!(check(&w, &f), vec![]);
    }

    #[test]
    fn order_lines_must_match_the_acknowledged_additems() {
        let (w, mut f) = world();
        if let Ok(o) = &mut f.orders[0] {
            o.items.insert("a".into(), 2);
            o.total = 9;
        }
        let v = check(&w, &f);
        assert!(v
            .iter()
            .any(|v| v.what.contains("holds 2 of item a; acknowledged 3")));
        let (w, mut f) = world();
        if let Ok(o) = &mut f.orders[0] {
            o.total = 12;
        }
        let v = check(&w, &f);
        assert_eq!(v.len(), 2, "{v:?}"); // the total, and the credit it took
        assert!(v[0].what.contains("total_cost 12 but its lines cost 11"));
    }

    #[test]
    fn negative_and_unreadable_values_are_violations() {
        let (w, mut f) = world();
        f.stock[1] = Ok(-1);
        f.credit[1] = Err("503".into());
        let v = check(&w, &f);
        assert!(v
            .iter()
            .any(|v| v.what == "stock of item b is negative: -1"));
        assert!(v
            .iter()
            .any(|v| v.what.contains("credit of user y cannot be read")));
    }

    #[test]
    fn an_unresolved_write_is_a_violation_and_widens_the_range() {
        let (mut w, mut f) = world();
        w.writes[0].reply = Reply::Status(503, json!({"error": "x"}));
        f.stock[1] = Ok(99); // the add not applied: within the range
        let v = check(&w, &f);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].what.contains("outcome still unknown"));
    }

    #[test]
    fn order_views_are_parsed() {
        let r = Reply::Status(
            200,
            json!({"order_id": "o", "paid": true, "items": [["a", 1], ["a", 2], ["b", 1]], "user_id": "x", "total_cost": 11}),
        );
        let v = order_view(&r).unwrap();
        assert_eq!(v.items.get("a"), Some(&3));
        assert!(v.paid);
        assert!(order_view(&Reply::Status(404, json!({"error": "x"}))).is_err());
    }
}
