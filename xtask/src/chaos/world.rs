//! What the load did and what the fleet answered: the entities it made, every direct write
//! and every checkout journey with its answers, and a log of every request for the per-fault
//! figures. The final checks and the report read only this (plus the final reads), so they
//! are plain functions of data and unit-tested without a fleet.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::client::{Class, Reply};

/// Seconds since the run started; every time in the world and the fault log uses it.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Clock(Instant::now())
    }

    pub fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// What a request was, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    Checkout,
    CreateOrder,
    AddItem,
    StockAdd,
    StockSubtract,
    AddFunds,
    Pay,
    FindItem,
    FindUser,
    FindOrder,
}

/// Why a checkout was refused, read from its 400 body (order/src/saga.rs: `checkout refused:
/// <reason>; <reason>`, one reason per step that did not apply; the participants' refusals
/// are `not enough <stock|credit> for ...`, a step without a reply is `<step> did not answer
/// in time`, a command applied too late is `the command expired ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Every reason is a business rule: not enough stock or credit.
    Business,
    /// Some step did not answer in time (or its command expired): the system's failure,
    /// dressed as a refusal.
    StepTimeout,
    /// Anything else (a 404, a step that failed, the order changed during checkout).
    Other,
}

pub fn classify_refusal(reply: &Reply) -> Refusal {
    let Some(text) = reply.error_text() else {
        return Refusal::Other;
    };
    let Some(reasons) = text.strip_prefix("checkout refused: ") else {
        return Refusal::Other;
    };
    let reasons: Vec<&str> = reasons.split("; ").collect();
    if reasons
        .iter()
        .any(|r| r.contains("did not answer in time") || r.contains("expired"))
    {
        Refusal::StepTimeout
    } else if reasons.iter().all(|r| r.starts_with("not enough ")) {
        Refusal::Business
    } else {
        Refusal::Other
    }
}

/// One request and its answer.
#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub kind: CallKind,
    pub sent: f64,
    pub answered: f64,
    pub class: Class,
    /// Checkouts answered 4xx only.
    pub refusal: Option<Refusal>,
}

impl Call {
    /// True when the request was out at any moment of `[from, to)`.
    pub fn overlaps(&self, from: f64, to: f64) -> bool {
        self.sent < to && self.answered >= from
    }
}

#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub price: i64,
    /// Stock when the load started.
    pub start: i64,
    /// What the load believes is left (acknowledged changes only); steers replenishing.
    pub estimate: i64,
    /// A replenishing add is out: do not send another.
    pub topping_up: bool,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub start: i64,
    pub estimate: i64,
    pub topping_up: bool,
    /// Never funded: every checkout of theirs is refused for credit.
    pub broke: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Item(usize),
    User(usize),
}

/// A direct write (stock add/subtract, add_funds, pay): `delta` is what it changes when
/// applied.
#[derive(Debug, Clone)]
pub struct Write {
    pub target: Target,
    pub delta: i64,
    pub path: String,
    pub key: String,
    pub sent: f64,
    /// The latest answer: the first one, or a retry's with the same key.
    pub reply: Reply,
}

/// A checkout request and its answer.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub key: String,
    pub sent: f64,
    pub reply: Reply,
}

/// One order's life: made, filled, checked out once.
#[derive(Debug, Clone)]
pub struct Journey {
    pub order: String,
    pub user: usize,
    /// addItems answered 2xx: (item index, quantity).
    pub acked: Vec<(usize, i64)>,
    /// addItems whose outcome stayed unknown.
    pub unknown: Vec<(usize, i64)>,
    pub checkout: Option<Checkout>,
}

#[derive(Debug, Default)]
pub struct World {
    pub items: Vec<Item>,
    pub users: Vec<User>,
    pub writes: Vec<Write>,
    pub journeys: Vec<Journey>,
    pub calls: Vec<Call>,
    /// Orders whose creation got no definite answer: never checked out.
    pub creates_lost: u64,
    /// Journeys not started because too many were already out (the fleet stalled).
    pub shed: u64,
    /// Every answer that was not a 2xx, by request kind, status and error text (numbers and
    /// ids masked): what went wrong, in a few lines.
    pub failures: BTreeMap<String, u64>,
}

impl World {
    pub fn log(&mut self, kind: CallKind, sent: f64, answered: f64, reply: &Reply) {
        let class = reply.class();
        if class != Class::Ok {
            *self.failures.entry(failure_key(kind, reply)).or_default() += 1;
        }
        let refusal = (kind == CallKind::Checkout && class == Class::Refused)
            .then(|| classify_refusal(reply));
        self.calls.push(Call {
            kind,
            sent,
            answered,
            class,
            refusal,
        });
    }

    /// The estimates follow an acknowledged write.
    pub fn note_write(&mut self, target: Target, delta: i64) {
        match target {
            Target::Item(i) => self.items[i].estimate += delta,
            Target::User(u) => self.users[u].estimate += delta,
        }
    }
}

/// `checkout 400 checkout refused: not enough stock for item # # available, # asked`: the
/// answer with every word that holds a digit masked, so answers of one kind count together.
fn failure_key(kind: CallKind, reply: &Reply) -> String {
    let text = match reply {
        Reply::Status(_, body) => body
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string()),
        Reply::NoAnswer(why) => why.clone(),
    };
    let masked: Vec<&str> = text
        .split_whitespace()
        .map(|w| {
            if w.chars().any(|c| c.is_ascii_digit()) {
                "#"
            } else {
                w
            }
        })
        .collect();
    let status = reply
        .status()
        .map(|s| s.to_string())
        .unwrap_or_else(|| "no answer".into());
    let line = format!("{kind:?} {status}: {}", masked.join(" "));
    line.chars().take(160).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(text: &str) -> Reply {
        Reply::Status(400, json!({ "error": text }))
    }

    #[test]
    fn refusals_are_told_apart_by_their_reasons() {
        let biz = refused("checkout refused: not enough stock for item 7: 0 available, 2 asked");
        assert_eq!(classify_refusal(&biz), Refusal::Business);
        let both = refused(
            "checkout refused: not enough stock for item 7: 0 available, 2 asked; not enough credit for user u: 1 available, 5 asked",
        );
        assert_eq!(classify_refusal(&both), Refusal::Business);
        let timeout = refused("checkout refused: stock did not answer in time");
        assert_eq!(classify_refusal(&timeout), Refusal::StepTimeout);
        let mixed = refused(
            "checkout refused: not enough stock for item 7: 0 available, 2 asked; payment did not answer in time",
        );
        assert_eq!(classify_refusal(&mixed), Refusal::StepTimeout);
        let expired = refused("checkout refused: the command expired before it could be applied");
        assert_eq!(classify_refusal(&expired), Refusal::StepTimeout);
        let other = refused("checkout refused: the order was changed or reset during checkout");
        assert_eq!(classify_refusal(&other), Refusal::Other);
        assert_eq!(
            classify_refusal(&refused("order 9 not found")),
            Refusal::Other
        );
        assert_eq!(
            classify_refusal(&Reply::Status(400, json!("<html>"))),
            Refusal::Other
        );
    }

    #[test]
    fn only_refused_checkouts_carry_a_refusal() {
        let mut w = World::default();
        w.log(
            CallKind::Checkout,
            1.0,
            2.0,
            &refused("checkout refused: not enough credit for user u1: 0 available, 1 asked"),
        );
        w.log(
            CallKind::StockSubtract,
            1.0,
            2.0,
            &refused("not enough stock"),
        );
        w.log(CallKind::Checkout, 1.0, 2.0, &Reply::Status(200, json!({})));
        assert_eq!(w.calls[0].refusal, Some(Refusal::Business));
        assert_eq!(w.calls[1].refusal, None);
        assert_eq!(w.calls[2].refusal, None);
        w.log(
            CallKind::Checkout,
            3.0,
            4.0,
            &refused("checkout refused: not enough credit for user v2: 2 available, 9 asked"),
        );
        assert_eq!(
            w.failures.get(
                "Checkout 400: checkout refused: not enough credit for user # # available, # asked"
            ),
            Some(&2)
        );
        assert_eq!(w.failures.len(), 2);
        assert!(w.calls[0].overlaps(2.0, 3.0));
        assert!(!w.calls[0].overlaps(2.5, 3.0));
        assert!(!w.calls[0].overlaps(0.0, 1.0));
    }
}
