//! Which items this instance's running sagas are reserving, so a saga can
//! choose how to send its two steps (`SAGA_STEPS=adaptive`, the default).
//!
//! Sending reserve and charge at once saves a whole step's wait, but when
//! stock refuses, the charge was for nothing: it must be refunded, two more
//! messages and two more transactions. Stock refuses when an item runs out,
//! and items run out when many checkouts want them at once (the consistency
//! scenario: 1000 checkouts of one item with 100 in stock). So a saga whose
//! items no other running saga of this instance is reserving sends both steps
//! at once; one that shares an item with another runs them in sequence and
//! charges only what was reserved.
//!
//! This only chooses an order of steps: both orders are correct, whatever
//! this map says (it is per instance, and it forgets a saga once its steps are done).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::messages::Line;
use common::types::ItemId;

/// How many of this instance's sagas are reserving each item (their steps not done yet).
#[derive(Clone, Default)]
pub struct Contention(Arc<Mutex<HashMap<ItemId, usize>>>);

impl Contention {
    /// Counts a saga reserving `lines` until the returned guard is dropped, and
    /// says whether another saga was reserving one of its items already.
    pub fn enter(&self, lines: &[Line]) -> (Entered, bool) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut contended = false;
        let mut items: Vec<ItemId> = lines.iter().map(|l| l.item_id.clone()).collect();
        items.sort();
        items.dedup();
        for item in &items {
            let count = counts.entry(item.clone()).or_insert(0);
            contended |= *count > 0;
            *count += 1;
        }
        let entered = Entered {
            map: self.clone(),
            items,
        };
        (entered, contended)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A saga counted in [`Contention`]; dropping it forgets the saga.
pub struct Entered {
    map: Contention,
    items: Vec<ItemId>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut counts = self.map.0.lock().unwrap_or_else(|e| e.into_inner());
        for item in &self.items {
            if let Some(count) = counts.get_mut(item) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(item);
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
        let (first, contended) = map.enter(&lines(&["a", "b"]));
        assert!(!contended, "nobody else was reserving a or b");
        let (_other, contended) = map.enter(&lines(&["c"]));
        assert!(!contended, "c is nobody else's");
        let (second, contended) = map.enter(&lines(&["b", "d"]));
        assert!(contended, "b is the first saga's too");
        drop(first);
        drop(second);
        let (_third, contended) = map.enter(&lines(&["a", "b", "d"]));
        assert!(
            !contended,
            "the sagas that reserved a, b and d were forgotten"
        );
    }

    #[test]
    fn an_item_listed_twice_in_one_order_does_not_contend_with_itself() {
        let map = Contention::default();
        let (entered, contended) = map.enter(&lines(&["a", "a"]));
        assert!(!contended);
        drop(entered);
        assert_eq!(map.len(), 0, "nothing left behind");
    }
}
