//! What a measured window collected per kind of request: an HDR latency histogram and the
//! answers by class (2xx, 4xx, 5xx, no answer), and the summary a report row shows.
//!
//! An HDR histogram rather than a list of samples: a 60 s run at a few thousand requests a
//! second would otherwise keep hundreds of thousands of samples, and percentiles of merged
//! histograms are exact to three significant figures whatever the range (1 µs .. 2 min).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to this (longer ones are clamped to it).
const MAX_MICROS: u64 = 120_000_000;

/// How an answer is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Ok,
    Refused,
    Failed,
    /// No HTTP answer: a broken connection or the client's timeout.
    Error,
}

impl Class {
    pub fn of_status(status: u16) -> Class {
        match status {
            200..=299 => Class::Ok,
            400..=499 => Class::Refused,
            // 1xx/3xx never come from this API; count them with the failures.
            _ => Class::Failed,
        }
    }
}

/// One kind of request's latencies and answers.
#[derive(Debug, Clone)]
pub struct Tally {
    hist: Histogram<u64>,
    pub ok: u64,
    pub refused: u64,
    pub failed: u64,
    pub errors: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            hist: Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds"),
            ok: 0,
            refused: 0,
            failed: 0,
            errors: 0,
        }
    }
}

impl Tally {
    pub fn record(&mut self, latency: Duration, class: Class) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        self.hist.saturating_record(micros);
        match class {
            Class::Ok => self.ok += 1,
            Class::Refused => self.refused += 1,
            Class::Failed => self.failed += 1,
            Class::Error => self.errors += 1,
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        self.hist
            .add(&other.hist)
            .expect("histograms with the same bounds merge");
        self.ok += other.ok;
        self.refused += other.refused;
        self.failed += other.failed;
        self.errors += other.errors;
    }

    pub fn count(&self) -> u64 {
        self.ok + self.refused + self.failed + self.errors
    }

    /// The row figures of this tally over a window of `seconds`.
    pub fn summary(&self, seconds: f64) -> Summary {
        let ms = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        let count = self.count();
        Summary {
            count,
            seconds,
            per_second: if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            },
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: self.hist.max() as f64 / 1000.0,
            mean_ms: self.hist.mean() / 1000.0,
            s2xx: self.ok,
            s4xx: self.refused,
            s5xx: self.failed,
            errors: self.errors,
        }
    }
}

/// Tallies by request label (`checkout`, `find order`, ...).
pub type Tallies = BTreeMap<&'static str, Tally>;

/// Adds every tally of `from` into `into`.
pub fn merge_into(into: &mut Tallies, from: &Tallies) {
    for (label, t) in from {
        into.entry(label).or_default().merge(t);
    }
}

/// All labels together.
pub fn total(tallies: &Tallies) -> Tally {
    let mut all = Tally::default();
    for t in tallies.values() {
        all.merge(t);
    }
    all
}

/// What a report row shows: throughput, latency percentiles (ms), answers by class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub s2xx: u64,
    pub s4xx: u64,
    pub s5xx: u64,
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut t = Tally::default();
        // 1..=100 ms, one each: p50 = 50, p95 = 95, p99 = 99, max = 100.
        for i in 1..=100 {
            t.record(ms(i), Class::Ok);
        }
        let s = t.summary(2.0);
        assert_eq!(s.count, 100);
        assert_eq!(s.per_second, 50.0);
        // Three significant figures: within 0.1 %.
        for (got, want) in [
            (s.p50_ms, 50.0),
            (s.p95_ms, 95.0),
            (s.p99_ms, 99.0),
            (s.max_ms, 100.0),
        ] {
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        }
        assert!((s.mean_ms - 50.5).abs() < 0.1, "{}", s.mean_ms);
    }

    #[test]
    fn classes_are_counted_apart() {
        let mut t = Tally::default();
        t.record(ms(1), Class::of_status(200));
        t.record(ms(1), Class::of_status(201));
        t.record(ms(1), Class::of_status(400));
        t.record(ms(1), Class::of_status(404));
        t.record(ms(1), Class::of_status(503));
        t.record(ms(1), Class::Error);
        let s = t.summary(1.0);
        assert_eq!((s.s2xx, s.s4xx, s.s5xx, s.errors), (2, 2, 1, 1));
        assert_eq!(s.count, 6);
    }

    #[test]
    fn merging_adds_counts_and_keeps_the_tail() {
        let mut a = Tallies::new();
        a.entry("checkout").or_default().record(ms(10), Class::Ok);
        let mut b = Tallies::new();
        b.entry("checkout")
            .or_default()
            .record(ms(2_000), Class::Refused);
        b.entry("find order").or_default().record(ms(1), Class::Ok);
        merge_into(&mut a, &b);
        assert_eq!(a.len(), 2);
        let c = a["checkout"].summary(1.0);
        assert_eq!((c.s2xx, c.s4xx), (1, 1));
        assert!((c.max_ms - 2_000.0).abs() < 2.0, "{}", c.max_ms);
        assert_eq!(total(&a).count(), 3);
    }

    #[test]
    fn extreme_latencies_are_clamped_not_lost() {
        let mut t = Tally::default();
        t.record(Duration::ZERO, Class::Ok);
        t.record(Duration::from_secs(3600), Class::Error);
        let s = t.summary(0.0);
        assert_eq!(s.count, 2);
        assert_eq!(s.per_second, 0.0);
        assert!((s.max_ms - 120_000.0).abs() < 120.0, "{}", s.max_ms);
    }
}
