//! Which items this instance's running sagas are reserving, and which stock
//! refused lately, so a saga can choose how to send its two steps
//! (`SAGA_STEPS=adaptive`, the default).
//!
//! Sending reserve and charge at once saves a whole step's wait, but when
//! stock refuses, the charge was for nothing: it must be refunded (two more
//! messages and two more transactions, and the user's credit held meanwhile).
//! Stock refuses when an item runs out: when many checkouts want it at once
//! (the consistency scenario: 1000 checkouts of one item with 100 in stock),
//! or when it has run out already. So a saga sends both steps at once unless
//! another running saga of this instance is reserving one of its items, or
//! stock refused a reservation of one of them in the last
//! [`REFUSAL_MEMORY`]; then it runs them in sequence and charges only what
//! was reserved.
//!
//! This only chooses an order of steps: both orders are correct, whatever
//! this map says (it is per instance, and it forgets a saga once its steps
//! are done).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::messages::Line;
use common::types::ItemId;

/// How long an item whose reservation stock refused counts as likely to run out.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(5);
/// Refusals remembered before the expired ones are swept out.
const REFUSALS_KEPT: usize = 4096;

/// The items of this instance's sagas that are likely to run out.
#[derive(Clone, Default)]
pub struct Contention(Arc<Mutex<Items>>);

#[derive(Default)]
struct Items {
    /// How many of this instance's sagas are reserving each item (their steps not done yet).
    reserving: HashMap<ItemId, usize>,
    /// When stock last refused a reservation of each item.
    refused: HashMap<ItemId, Instant>,
}

impl Contention {
    /// Counts a saga reserving `lines` until the returned guard is dropped, and
    /// says whether one of its items is likely to run out: another saga is
    /// reserving it already, or stock refused it lately.
    pub fn enter(&self, lines: &[Line]) -> (Entered, bool) {
        self.enter_at(lines, Instant::now())
    }

    fn enter_at(&self, lines: &[Line], now: Instant) -> (Entered, bool) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut items: Vec<ItemId> = lines.iter().map(|l| l.item_id.clone()).collect();
        items.sort();
        items.dedup();
        let mut scarce = items.iter().any(|item| {
            map.refused
                .get(item)
                .is_some_and(|at| now.saturating_duration_since(*at) < REFUSAL_MEMORY)
        });
        for item in &items {
            let count = map.reserving.entry(item.clone()).or_insert(0);
            scarce |= *count > 0;
            *count += 1;
        }
        let entered = Entered {
            map: self.clone(),
            items,
        };
        (entered, scarce)
    }

    /// Stock refused to reserve `lines`: their items count as likely to run out for a while.
    pub fn refused(&self, lines: &[Line]) {
        self.refused_at(lines, Instant::now())
    }

    fn refused_at(&self, lines: &[Line], now: Instant) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.refused.len() >= REFUSALS_KEPT {
            map.refused
                .retain(|_, at| now.saturating_duration_since(*at) < REFUSAL_MEMORY);
        }
        for line in lines {
            map.refused.insert(line.item_id.clone(), now);
        }
    }

    #[cfg(test)]
    fn reserving(&self) -> usize {
        self.0.lock().unwrap().reserving.len()
    }
}

/// A saga counted in [`Contention`]; dropping it forgets the saga.
pub struct Entered {
    map: Contention,
    items: Vec<ItemId>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut map = self.map.0.lock().unwrap_or_else(|e| e.into_inner());
        for item in &self.items {
            if let Some(count) = map.reserving.get_mut(item) {
                *count -= 1;
                if *count == 0 {
                    map.reserving.remove(item);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::types::Amount;

    fn lines(items: &[&str]) -> Vec<Line> {
        items
            .iter()
            .map(|item| Line {
                item_id: ItemId::parse(item).unwrap(),
                quantity: Amount::new(1).unwrap(),
            })
            .collect()
    }

    #[test]
    fn a_saga_is_contended_while_another_reserves_one_of_its_items() {
        let map = Contention::default();
        let (first, scarce) = map.enter(&lines(&["a", "b"]));
        assert!(!scarce, "nobody else was reserving a or b");
        let (_other, scarce) = map.enter(&lines(&["c"]));
        assert!(!scarce, "c is nobody else's");
        let (second, scarce) = map.enter(&lines(&["b", "d"]));
        assert!(scarce, "b is the first saga's too");
        drop(first);
        drop(second);
        let (_third, scarce) = map.enter(&lines(&["a", "b", "d"]));
        assert!(!scarce, "the sagas that reserved a, b and d were forgotten");
    }

    #[test]
    fn an_item_listed_twice_in_one_order_does_not_contend_with_itself() {
        let map = Contention::default();
        let (entered, scarce) = map.enter(&lines(&["a", "a"]));
        assert!(!scarce);
        drop(entered);
        assert_eq!(map.reserving(), 0, "nothing left behind");
    }

    #[test]
    fn an_item_stock_refused_counts_as_scarce_for_a_while() {
        let map = Contention::default();
        let now = Instant::now();
        map.refused_at(&lines(&["a"]), now);
        let (_, scarce) = map.enter_at(&lines(&["b", "a"]), now + Duration::from_secs(1));
        assert!(scarce, "a was refused a second ago");
        let (_, scarce) = map.enter_at(&lines(&["b"]), now + Duration::from_secs(1));
        assert!(!scarce, "b never was");
        let (_, scarce) = map.enter_at(&lines(&["a"]), now + REFUSAL_MEMORY);
        assert!(!scarce, "the refusal is forgotten");
    }

    #[test]
    fn old_refusals_are_swept_out() {
        let map = Contention::default();
        let then = Instant::now();
        let many: Vec<String> = (0..REFUSALS_KEPT).map(|i| format!("i{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        map.refused_at(&lines(&many), then);
        map.refused_at(&lines(&["fresh"]), then + REFUSAL_MEMORY);
        assert_eq!(
            map.0.lock().unwrap().refused.len(),
            1,
            "only the fresh one is left"
        );
    }
}
