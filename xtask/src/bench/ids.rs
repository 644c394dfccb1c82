//! Fresh order ids, and finding how many batch ids a store already has.
//!
//! Checking out an order that is already paid costs almost nothing (it answers 200 from the
//! order alone), so a figure that counted such checkouts would flatter the fleet. A run
//! therefore batch-initialises a range of orders (which makes them unpaid again) and hands
//! every id of it out exactly once ([`Ids`]); when the range is used up the run ends early and
//! says so, rather than reuse an order.

use std::sync::atomic::{AtomicU64, Ordering};

/// Ids `start..end`, each handed out once, from any number of tasks.
#[derive(Debug)]
pub struct Ids {
    next: AtomicU64,
    end: u64,
}

impl Ids {
    pub fn new(start: u64, end: u64) -> Ids {
        Ids {
            next: AtomicU64::new(start),
            end,
        }
    }

    /// The next unused id, or `None` once all are taken.
    pub fn take(&self) -> Option<u64> {
        self.next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.end).then_some(n + 1)
            })
            .ok()
    }
}

/// How many orders a run may need: a closed loop for `seconds` at up to `ceiling` checkouts
/// a second (at least `floor`), or an open loop's whole schedule plus a little slack.
pub fn orders_needed(seconds: f64, rate: Option<f64>, ceiling: f64, floor: u64) -> u64 {
    let n = match rate {
        Some(r) => (r * seconds * 1.02).ceil() + 100.0,
        None => (ceiling * seconds).ceil(),
    };
    (n as u64).max(floor)
}

/// Finds how many ids `0..n` exist when they exist as one prefix (batch ids do: every
/// `batch_init` writes `0..n-1`): first doubling until an id is missing, then bisecting.
/// A state machine rather than a loop over a closure, so the caller may ask over HTTP.
#[derive(Debug, Clone)]
pub struct Extent {
    /// Highest id known to exist (`None`: not even 0 checked yet).
    lo: Option<u64>,
    /// Lowest id known missing.
    hi: Option<u64>,
}

/// Give up doubling here (no store holds a billion batch entities).
const EXTENT_LIMIT: u64 = 1 << 30;

impl Default for Extent {
    fn default() -> Self {
        Self::new()
    }
}

impl Extent {
    pub fn new() -> Extent {
        Extent { lo: None, hi: None }
    }

    /// The id to look up next, or `None` when the count is known ([`Extent::count`]).
    pub fn probe(&self) -> Option<u64> {
        match (self.lo, self.hi) {
            (None, None) => Some(0),
            (None, Some(_)) => None, // 0 is missing: nothing exists
            (Some(lo), None) => {
                Some(if lo == 0 { 1 } else { lo * 2 }).filter(|&p| p <= EXTENT_LIMIT)
            }
            (Some(lo), Some(hi)) => (hi - lo > 1).then(|| lo + (hi - lo) / 2),
        }
    }

    /// What the lookup of `id` found.
    pub fn answer(&mut self, id: u64, exists: bool) {
        if exists {
            self.lo = Some(self.lo.map_or(id, |lo| lo.max(id)));
        } else {
            self.hi = Some(self.hi.map_or(id, |hi| hi.min(id)));
        }
    }

    /// How many ids exist, once [`Extent::probe`] says `None`.
    pub fn count(&self) -> u64 {
        match (self.lo, self.hi) {
            (None, _) => 0,
            (Some(_), Some(hi)) => hi,
            (Some(lo), None) => lo + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    #[test]
    fn every_id_is_handed_out_exactly_once_across_threads() {
        let ids = Arc::new(Ids::new(1_000, 21_000));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (ids, seen) = (ids.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(id) = ids.take() {
                        mine.push(id);
                    }
                    seen.lock().unwrap().extend(mine);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seen = seen.lock().unwrap();
        let distinct: HashSet<u64> = seen.iter().copied().collect();
        assert_eq!(seen.len(), 20_000, "an id was handed out twice or lost");
        assert_eq!(distinct.len(), 20_000);
        assert_eq!(*distinct.iter().min().unwrap(), 1_000);
        assert_eq!(*distinct.iter().max().unwrap(), 20_999);
        // Used up: stays used up.
        assert_eq!(ids.take(), None);
        assert_eq!(ids.take(), None);
    }

    #[test]
    fn runs_get_enough_orders() {
        // Closed loop: a minute at up to 6000/s.
        assert_eq!(orders_needed(60.0, None, 6000.0, 100_000), 360_000);
        assert_eq!(orders_needed(5.0, None, 6000.0, 100_000), 100_000);
        // Open loop: the schedule and 2 % more.
        assert_eq!(orders_needed(60.0, Some(2000.0), 6000.0, 0), 122_500);
    }

    fn extent_of(existing: u64) -> (u64, usize) {
        let mut e = Extent::new();
        let mut asked = 0;
        while let Some(id) = e.probe() {
            asked += 1;
            e.answer(id, id < existing);
        }
        (e.count(), asked)
    }

    #[test]
    fn the_extent_search_finds_every_count_quickly() {
        for n in [
            0, 1, 2, 3, 4, 5, 7, 8, 9, 100, 99_999, 100_000, 100_001, 360_000,
        ] {
            let (count, asked) = extent_of(n);
            assert_eq!(count, n);
            assert!(asked <= 2 * 20 + 2, "{n}: {asked} lookups");
        }
    }
}
