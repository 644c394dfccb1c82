//! Serialises work on the same key inside one process.
//!
//! The consistency benchmark puts a thousand concurrent checkouts on one
//! item. If each raced the others with WATCH, almost every EXEC would fail
//! and be retried: throughput would collapse. Taking a per-key lock first
//! means WATCH only ever arbitrates between *processes*. Keys are hashed
//! onto a fixed set of stripes (no map that grows without bound); a command
//! that touches several keys takes their stripes in ascending order, so two
//! such commands can never wait on each other in a cycle.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

pub struct KeyLocks {
    stripes: Vec<Mutex<()>>,
}

/// Held while the keys are being worked on; dropping it lets the next task in.
pub struct KeyGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl KeyLocks {
    pub fn new(stripes: usize) -> Self {
        Self {
            stripes: (0..stripes.max(1)).map(|_| Mutex::new(())).collect(),
        }
    }

    fn stripe_of(&self, key: &str) -> usize {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.stripes.len() as u64) as usize
    }

    /// Locks every stripe the keys fall on, in ascending order.
    pub async fn lock<'a>(&'a self, keys: impl IntoIterator<Item = &str>) -> KeyGuard<'a> {
        let mut stripes: Vec<usize> = keys.into_iter().map(|k| self.stripe_of(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.stripes[s].lock().await);
        }
        KeyGuard { _guards: guards }
    }
}

impl Default for KeyLocks {
    fn default() -> Self {
        KeyLocks::new(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn same_key_waits_other_key_does_not() {
        let locks = Arc::new(KeyLocks::new(64));
        let held = locks.lock(["a", "b"]).await;
        let l2 = locks.clone();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let acquired = Arc::new(AtomicBool::new(false));
        let acquired2 = acquired.clone();
        let same = tokio::spawn(async move {
            started_tx.send(()).unwrap();
            // The other order of the same keys: stripes are taken sorted, so no deadlock.
            let _g = l2.lock(["b", "a"]).await;
            acquired2.store(true, Ordering::SeqCst);
        });
        // The second locker has run up to its `lock` call...
        tokio::time::timeout(Duration::from_secs(1), started_rx)
            .await
            .expect("the second locker never started")
            .unwrap();
        // ...and, given time to get in, it has not.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!same.is_finished(), "second lock on the same keys got in");
        assert!(
            !acquired.load(Ordering::SeqCst),
            "second lock on the same keys got in"
        );
        let other = (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| {
                locks.stripe_of(k) != locks.stripe_of("a")
                    && locks.stripe_of(k) != locks.stripe_of("b")
            })
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), locks.lock([other.as_str()]))
            .await
            .expect("a lock on another key waited");
        assert!(
            !acquired.load(Ordering::SeqCst),
            "second lock on the same keys got in while the first was held"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), same)
            .await
            .expect("released lock never handed over")
            .unwrap();
        assert!(
            acquired.load(Ordering::SeqCst),
            "the second locker finished without taking the lock"
        );
    }
}
