//! `batch_init` as one rule instead of n hashes.
//!
//! Writing 100k hashes costs the master and both replicas 100k commands each:
//! on two shared cores that alone took 0.7-0.8 s per service. So `batch_init(n)`
//! records a rule, "ids `0`..`n-1` start at this count (and price) in this
//! epoch", in one small MULTI/EXEC, and a counter is written as a hash of its
//! own only when something changes it (it is *materialised*).
//!
//! Rules live in one sorted set per family (`itembatches`), scored by `n`, and
//! a new rule removes every rule whose ids it covers entirely (`n' <= n`). So
//! the rules kept cover ever fewer ids the newer they are, and the newest rule
//! that covers id `i` is the one with the smallest `n > i`: one
//! `ZRANGEBYSCORE (i +inf LIMIT 0 1` finds it.
//!
//! What a batch id's counter is, given its hash and the rule that covers it:
//! - the hash, when its `epoch` is the rule's: materialised from this rule;
//! - the rule's values otherwise: there is no hash yet, or it belongs to an
//!   earlier epoch, which this rule overwrote (the old hash stays until the
//!   next write replaces it whole);
//! - the hash as it is when no rule covers the id (a counter written by an
//!   earlier version, which wrote every batch counter as a hash).
//!
//! Transactions watch the counter's hash, not the rules: a change decided
//! from an epoch that a `batch_init` overwrote while it was being decided
//! writes a hash tagged with that old epoch, which the new rule hides; the
//! change then simply took effect just before the `batch_init`
//! (`common/tests/batches.rs` races 1000 takes against one).

use serde::{Deserialize, Serialize};

use crate::types::Amount;

/// One `batch_init`: the values ids `0`..`n-1` start with (`n` is the score).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Rule {
    pub epoch: String,
    pub count: Amount,
    /// The family's other fields, in the order `Counters::others` names them.
    pub others: Vec<Amount>,
}

impl Rule {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("rules serialize")
    }

    pub fn decode(text: &str) -> Result<Rule, String> {
        serde_json::from_str(text).map_err(|e| format!("batch rule {text:?}: {e}"))
    }
}

/// The index of a batch id: `Some(i)` for the canonical decimal `"i"` that
/// `batch_init` names, `None` for a UUID (from `create`) or a decimal in
/// another spelling (`"007"`), which no rule covers.
pub(super) fn batch_index(id: &str) -> Option<u64> {
    let i: u64 = id.parse().ok()?;
    (i.to_string() == id).then_some(i)
}

/// A counter's stored hash, as read: the count, `held`, `epoch` and the
/// family's other fields (`None`: field absent).
pub(super) struct Stored {
    pub count: Option<i64>,
    pub held: Option<i64>,
    pub epoch: Option<String>,
    pub others: Vec<Option<i64>>,
}

/// Where a counter's current value comes from (see the module comment).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The hash holds it.
    Hash,
    /// The rule does; the first write must write every field.
    Rule(Rule),
    /// Neither: no such counter.
    Missing,
}

/// Which of a counter's hash and its covering rule holds its value.
pub(super) fn source(stored: &Stored, rule: Option<Rule>) -> Source {
    match rule {
        Some(rule) if stored.count.is_none() || stored.epoch.as_deref() != Some(&rule.epoch) => {
            Source::Rule(rule)
        }
        _ if stored.count.is_some() => Source::Hash,
        _ => Source::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(epoch: &str, count: i64) -> Rule {
        Rule {
            epoch: epoch.into(),
            count: Amount::new(count).unwrap(),
            others: vec![Amount::new(1).unwrap()],
        }
    }

    fn stored(count: Option<i64>, epoch: Option<&str>) -> Stored {
        Stored {
            count,
            held: Some(0),
            epoch: epoch.map(str::to_string),
            others: vec![Some(1)],
        }
    }

    #[test]
    fn only_canonical_decimals_are_batch_ids() {
        assert_eq!(batch_index("0"), Some(0));
        assert_eq!(batch_index("99999"), Some(99999));
        for id in [
            "007",
            "-1",
            "+1",
            "1e3",
            "",
            "6f1c0b9e-0000-4000-8000-000000000000",
        ] {
            assert_eq!(batch_index(id), None, "{id:?}");
        }
    }

    #[test]
    fn the_hash_counts_only_in_its_rules_epoch() {
        let r = rule("e2", 10);
        // Materialised from this rule: the hash.
        assert_eq!(
            source(&stored(Some(3), Some("e2")), Some(r.clone())),
            Source::Hash
        );
        // Not materialised, or from an epoch the rule overwrote: the rule.
        assert_eq!(
            source(&stored(None, None), Some(r.clone())),
            Source::Rule(r.clone())
        );
        assert_eq!(
            source(&stored(Some(3), Some("e1")), Some(r.clone())),
            Source::Rule(r)
        );
        // No rule: the hash as it is, or nothing.
        assert_eq!(source(&stored(Some(3), Some("e1")), None), Source::Hash);
        assert_eq!(source(&stored(None, None), None), Source::Missing);
    }

    #[test]
    fn rules_round_trip() {
        let r = rule("e1", 5);
        assert_eq!(Rule::decode(&r.encode()).unwrap(), r);
        assert!(Rule::decode("5").is_err());
    }
}
