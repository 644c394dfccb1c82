//! The figures of a chaos run: one row per fault, a summary per fault kind, and the issue's
//! targets, computed from the request log and the fault log (plain functions of data).
//!
//! A fault's window runs from its first signal until every process was back and a checkout
//! sent after that succeeded, plus the settle time: the windows of consecutive faults tile
//! the fault phase. A checkout counts for a window when it was out at any moment of it.

use std::collections::BTreeMap;

use serde::Serialize;

use super::checks::Violation;
use super::client::Class;
use super::faults::{Fault, Injection};
use super::world::{Call, CallKind, Refusal};

/// One fault as it went.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRun {
    pub fault: Fault,
    /// None when it could not be injected (see `error`).
    pub injection: Option<Injection>,
    pub error: Option<String>,
    /// Seconds from the first signal until every process was back; None: never.
    pub back_after: Option<f64>,
    /// What was not back when the wait gave up (or: checkouts did not succeed again).
    pub not_back: Vec<String>,
    /// End of its window (clock seconds).
    pub end: f64,
}

/// Checkout answers, by what they mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: u64,
    /// 4xx for not enough stock or credit.
    pub refused: u64,
    /// 4xx because a step did not answer in time.
    pub refused_late: u64,
    /// Any other 4xx.
    pub refused_other: u64,
    /// 5xx.
    pub failed: u64,
    pub no_answer: u64,
}

impl Counts {
    pub fn add(&mut self, call: &Call) {
        match (call.class, call.refusal) {
            (Class::Ok, _) => self.ok += 1,
            (Class::Refused, Some(Refusal::Business)) => self.refused += 1,
            (Class::Refused, Some(Refusal::StepTimeout)) => self.refused_late += 1,
            (Class::Refused, _) => self.refused_other += 1,
            (Class::Failed, _) => self.failed += 1,
            (Class::NoAnswer, _) => self.no_answer += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.ok
            + self.refused
            + self.refused_late
            + self.refused_other
            + self.failed
            + self.no_answer
    }

    /// Answered 2xx or 4xx, in percent (100 when there was nothing to answer).
    pub fn answered_pct(&self) -> f64 {
        pct(self.total() - self.failed - self.no_answer, self.total())
    }

    /// Answered by a business rule: paid, or refused for stock or credit.
    pub fn business(&self) -> u64 {
        self.ok + self.refused
    }

    /// Neither paid nor refused by a business rule.
    pub fn failures(&self) -> u64 {
        self.total() - self.business()
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub n: usize,
    pub fault: String,
    pub kind: String,
    pub target: String,
    /// Clock seconds of the first signal.
    pub at: Option<f64>,
    pub back_s: Option<f64>,
    /// Until checkouts succeeded again (see [`recovery`]).
    pub checkouts_ok_again_s: Option<f64>,
    /// Checkouts out during the window.
    pub checkouts: Counts,
    /// Checkouts out at the moment of the first signal.
    pub in_flight: Counts,
    /// Other requests out during the window answered 5xx or not at all.
    pub others_failed: u64,
    pub others: u64,
    pub violations: usize,
    pub error: Option<String>,
    pub not_back: Vec<String>,
}

/// Time from `at` until checkouts succeed again: the answer time of the first 2xx checkout
/// sent after `at` and after the last checkout in the window that failed (5xx, no answer, or
/// refused because a step did not answer). None when none did.
pub fn recovery(calls: &[Call], at: f64, end: f64) -> Option<f64> {
    let checkouts = || {
        calls
            .iter()
            .filter(|c| c.kind == CallKind::Checkout && c.overlaps(at, end))
    };
    let bad = |c: &&Call| {
        matches!(c.class, Class::Failed | Class::NoAnswer)
            || (c.class == Class::Refused && c.refusal != Some(Refusal::Business))
    };
    let last_bad = checkouts().filter(bad).map(|c| c.sent).fold(at, f64::max);
    checkouts()
        .filter(|c| c.class == Class::Ok && c.sent >= last_bad)
        .map(|c| c.answered)
        .reduce(f64::min)
        .map(|t| t - at)
}

pub fn rows(runs: &[FaultRun], calls: &[Call], violations: &[Violation]) -> Vec<Row> {
    runs.iter()
        .enumerate()
        .map(|(i, run)| {
            let mut row = Row {
                n: i + 1,
                fault: run.fault.label(),
                kind: run.fault.kind().to_string(),
                target: String::new(),
                at: None,
                back_s: run.back_after,
                checkouts_ok_again_s: None,
                checkouts: Counts::default(),
                in_flight: Counts::default(),
                others_failed: 0,
                others: 0,
                violations: 0,
                error: run.error.clone(),
                not_back: run.not_back.clone(),
            };
            let Some(inj) = &run.injection else {
                return row;
            };
            let (at, end) = (inj.at, run.end);
            row.target = inj.target.clone();
            row.at = Some(at);
            row.checkouts_ok_again_s = recovery(calls, at, end);
            for c in calls.iter().filter(|c| c.overlaps(at, end)) {
                if c.kind == CallKind::Checkout {
                    row.checkouts.add(c);
                    if c.sent <= at && c.answered >= at {
                        row.in_flight.add(c);
                    }
                } else {
                    row.others += 1;
                    if matches!(c.class, Class::Failed | Class::NoAnswer) {
                        row.others_failed += 1;
                    }
                }
            }
            row.violations = violations
                .iter()
                .filter(|v| v.at.is_some_and(|t| t >= at && t < end))
                .count();
            row
        })
        .collect()
}

/// Per fault kind: how often, the longest times, the worst share answered.
#[derive(Debug, Clone, Serialize)]
pub struct KindSummary {
    pub kind: String,
    pub runs: usize,
    pub longest_back_s: Option<f64>,
    pub longest_checkouts_ok_again_s: Option<f64>,
    pub checkouts: Counts,
    pub in_flight: Counts,
}

pub fn by_kind(rows: &[Row]) -> Vec<KindSummary> {
    let mut kinds: BTreeMap<&str, KindSummary> = BTreeMap::new();
    for r in rows {
        let k = kinds.entry(&r.kind).or_insert_with(|| KindSummary {
            kind: r.kind.clone(),
            runs: 0,
            longest_back_s: None,
            longest_checkouts_ok_again_s: None,
            checkouts: Counts::default(),
            in_flight: Counts::default(),
        });
        k.runs += 1;
        let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        k.longest_back_s = max(k.longest_back_s, r.back_s);
        k.longest_checkouts_ok_again_s =
            max(k.longest_checkouts_ok_again_s, r.checkouts_ok_again_s);
        for (sum, add) in [
            (&mut k.checkouts, &r.checkouts),
            (&mut k.in_flight, &r.in_flight),
        ] {
            sum.ok += add.ok;
            sum.refused += add.refused;
            sum.refused_late += add.refused_late;
            sum.refused_other += add.refused_other;
            sum.failed += add.failed;
            sum.no_answer += add.no_answer;
        }
    }
    kinds.into_values().collect()
}

/// Checkouts out during any fault's window, each counted once (one that spans two windows is
/// in both rows).
pub fn during_faults(runs: &[FaultRun], calls: &[Call]) -> Counts {
    let windows: Vec<(f64, f64)> = runs
        .iter()
        .filter_map(|r| Some((r.injection.as_ref()?.at, r.end)))
        .collect();
    let mut during = Counts::default();
    for c in calls.iter().filter(|c| c.kind == CallKind::Checkout) {
        if windows.iter().any(|&(from, to)| c.overlaps(from, to)) {
            during.add(c);
        }
    }
    during
}

/// The targets for a run, each as (text, met).
pub fn targets(rows: &[Row], kinds: &[KindSummary], during: &Counts) -> Vec<(String, bool)> {
    let mut out = vec![(
        format!(
            "checkouts during faults answered 2xx or 4xx: {:.2} % of {} (target >= 99 %)",
            during.answered_pct(),
            during.total()
        ),
        during.answered_pct() >= 99.0,
    )];
    if let Some(k) = kinds.iter().find(|k| k.kind == "kill-broker") {
        // At a modest rate only a few checkouts are out at the very moment of the kill, so the
        // whole window (checkouts that waited for the broker to come back) is judged too.
        let at_kill = pct(k.in_flight.business(), k.in_flight.total());
        let window = pct(k.checkouts.business(), k.checkouts.total());
        out.push((
            format!(
                "broker kill: answered by business rule (paid, or refused for stock/credit): \
                 {at_kill:.1} % of the {} checkouts in flight at the kill, {window:.2} % of the {} \
                 out until it healed (target >= 95 %)",
                k.in_flight.total(),
                k.checkouts.total()
            ),
            at_kill >= 95.0 && window >= 95.0,
        ));
    }
    if let Some(k) = kinds.iter().find(|k| k.kind == "rolling-restart") {
        let failed = k.checkouts.failures();
        out.push((
            format!(
                "rolling restart: failed checkouts: {failed} of {} (target 0)",
                k.checkouts.total()
            ),
            failed == 0,
        ));
    }
    let not_back: Vec<&Row> = rows
        .iter()
        .filter(|r| r.back_s.is_none() || r.error.is_some() || !r.not_back.is_empty())
        .collect();
    out.push((
        format!(
            "every process back after each fault: {} of {} faults",
            rows.len() - not_back.len(),
            rows.len()
        ),
        not_back.is_empty(),
    ));
    out
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into())
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}~", s.chars().take(n - 1).collect::<String>())
    }
}

/// The per-fault table, for people.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:>3} {:<20} {:<34} {:>6} {:>7} | {:>5} {:>5} {:>5} {:>5} {:>5} {:>4} {:>4} {:>7} {:>7} | {:>4} {:>6} | {:>6} {:>4}\n",
        "#", "fault", "target", "back", "ok-in", "outs", "2xx", "4xx", "4xx-t", "4xx-o", "5xx", "none", "ans%", "biz%", "infl", "ibiz%", "other!", "viol"
    );
    for r in rows {
        let c = &r.checkouts;
        out.push_str(&format!(
            "{:>3} {:<20} {:<34} {:>6} {:>7} | {:>5} {:>5} {:>5} {:>5} {:>5} {:>4} {:>4} {:>7.2} {:>7.2} | {:>4} {:>6.1} | {:>6} {:>4}\n",
            r.n,
            cut(&r.fault, 20),
            cut(if r.target.is_empty() { "-" } else { &r.target }, 34),
            secs(r.back_s),
            secs(r.checkouts_ok_again_s),
            c.total(),
            c.ok,
            c.refused,
            c.refused_late,
            c.refused_other,
            c.failed,
            c.no_answer,
            c.answered_pct(),
            pct(c.business(), c.total()),
            r.in_flight.total(),
            pct(r.in_flight.business(), r.in_flight.total()),
            r.others_failed,
            r.violations,
        ));
        if let Some(e) = &r.error {
            out.push_str(&format!("      not injected: {e}\n"));
        }
        if !r.not_back.is_empty() {
            out.push_str(&format!("      not back: {}\n", r.not_back.join("; ")));
        }
    }
    out.push_str(
        "back: s until every process was back; ok-in: s until checkouts succeeded again; \
         outs: checkouts out during the window; 4xx: refused for stock/credit; 4xx-t: refused \
         because a step did not answer in time; 4xx-o: other 4xx; ans%: 2xx+4xx; biz%: 2xx+4xx \
         for stock/credit (answered by a business rule); infl: checkouts in flight at the first \
         signal; ibiz%: biz% of those; other!: other requests answered 5xx or not at all\n",
    );
    out
}

/// Per kind, for people.
pub fn kind_table(kinds: &[KindSummary]) -> String {
    let mut out = format!(
        "{:<16} {:>4} {:>10} {:>10} {:>7} {:>8} {:>8} {:>6} {:>6}\n",
        "kind", "runs", "max back", "max ok-in", "outs", "ans%", "biz%", "infl", "ibiz%"
    );
    for k in kinds {
        out.push_str(&format!(
            "{:<16} {:>4} {:>10} {:>10} {:>7} {:>8.2} {:>8.2} {:>6} {:>6.1}\n",
            k.kind,
            k.runs,
            secs(k.longest_back_s),
            secs(k.longest_checkouts_ok_again_s),
            k.checkouts.total(),
            k.checkouts.answered_pct(),
            pct(k.checkouts.business(), k.checkouts.total()),
            k.in_flight.total(),
            pct(k.in_flight.business(), k.in_flight.total()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(
        kind: CallKind,
        sent: f64,
        answered: f64,
        class: Class,
        refusal: Option<Refusal>,
    ) -> Call {
        Call {
            kind,
            sent,
            answered,
            class,
            refusal,
        }
    }

    fn co(sent: f64, answered: f64, class: Class) -> Call {
        let refusal = (class == Class::Refused).then_some(Refusal::Business);
        call(CallKind::Checkout, sent, answered, class, refusal)
    }

    #[test]
    fn recovery_waits_for_a_success_after_the_last_failure() {
        let calls = vec![
            co(9.0, 9.5, Class::Ok),  // before
            co(9.8, 10.4, Class::Ok), // in flight, fine: not a recovery (sent before)
            co(10.2, 12.0, Class::Failed),
            co(10.5, 11.0, Class::Refused), // business refusal: not a failure
            co(11.0, 11.9, Class::Ok),      // sent before the last failure
            co(11.5, 11.6, Class::NoAnswer),
            co(11.7, 13.2, Class::Ok), // first success after the last failure
            co(12.0, 12.9, Class::Ok), // sent later, answered earlier: this one counts
        ];
        assert_eq!(recovery(&calls, 10.0, 20.0), Some(2.9000000000000004));
        // Nothing failed: the first success sent after the signal.
        let calm = vec![co(9.0, 10.5, Class::Ok), co(10.1, 10.3, Class::Ok)];
        let r = recovery(&calm, 10.0, 20.0).unwrap();
        assert!((r - 0.3).abs() < 1e-9);
        // A step-timeout refusal counts as a failure.
        let late = vec![
            call(
                CallKind::Checkout,
                10.1,
                20.0,
                Class::Refused,
                Some(Refusal::StepTimeout),
            ),
            co(10.2, 10.3, Class::Ok),
            co(12.0, 12.5, Class::Ok),
        ];
        assert!((recovery(&late, 10.0, 30.0).unwrap() - 0.3).abs() < 1e-9);
        let late = vec![
            call(
                CallKind::Checkout,
                10.5,
                20.0,
                Class::Refused,
                Some(Refusal::StepTimeout),
            ),
            co(10.2, 10.3, Class::Ok),
            co(12.0, 12.5, Class::Ok),
        ];
        assert!((recovery(&late, 10.0, 30.0).unwrap() - 2.5).abs() < 1e-9);
        assert_eq!(recovery(&[co(10.5, 11.0, Class::Failed)], 10.0, 20.0), None);
    }

    fn run(fault: Fault, at: f64, end: f64) -> FaultRun {
        FaultRun {
            fault,
            injection: Some(Injection {
                target: "x".into(),
                at,
                done: at,
            }),
            error: None,
            back_after: Some(1.0),
            not_back: vec![],
            end,
        }
    }

    #[test]
    fn rows_count_what_was_out_during_each_window() {
        let runs = vec![
            run(Fault::KillBroker, 10.0, 20.0),
            run(Fault::RollingRestart, 20.0, 40.0),
        ];
        let calls = vec![
            co(9.0, 11.0, Class::Ok), // in flight at the broker kill
            call(
                CallKind::Checkout,
                9.5,
                15.0,
                Class::Refused,
                Some(Refusal::StepTimeout),
            ),
            co(12.0, 13.0, Class::Failed),
            co(19.5, 21.0, Class::NoAnswer), // out in both windows
            co(25.0, 26.0, Class::Ok),
            call(CallKind::FindItem, 12.0, 12.1, Class::Failed, None),
            call(CallKind::FindItem, 12.0, 12.1, Class::Ok, None),
            co(45.0, 46.0, Class::Ok), // after both
        ];
        let violations = vec![
            Violation {
                what: "a".into(),
                at: Some(12.0),
            },
            Violation {
                what: "b".into(),
                at: None,
            },
        ];
        let rows = rows(&runs, &calls, &violations);
        let (b, r) = (&rows[0], &rows[1]);
        assert_eq!(b.checkouts.total(), 4);
        assert_eq!(
            (
                b.checkouts.ok,
                b.checkouts.refused_late,
                b.checkouts.failed,
                b.checkouts.no_answer
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(b.in_flight.total(), 2);
        assert_eq!(b.in_flight.business(), 1);
        assert_eq!((b.others, b.others_failed), (2, 1));
        assert_eq!(b.violations, 1);
        assert_eq!(r.checkouts.total(), 2);
        assert_eq!(r.checkouts.failures(), 1);
        assert_eq!(r.violations, 0);

        let kinds = by_kind(&rows);
        assert_eq!(kinds.len(), 2);
        let during = during_faults(&runs, &calls);
        assert_eq!(
            during.total(),
            5,
            "the checkout out in both windows counts once"
        );
        let t = targets(&rows, &kinds, &during);
        assert_eq!(t.len(), 4);
        assert!(t[0].0.contains("60.00 % of 5"), "{}", t[0].0);
        assert!(!t[0].1);
        assert!(
            t[1].0.contains("50.0 % of the 2 checkouts in flight"),
            "{}",
            t[1].0
        );
        assert!(t[1].0.contains("25.00 % of the 4 out"), "{}", t[1].0);
        assert!(!t[1].1);
        assert!(t[2].0.contains("failed checkouts: 1 of 2"));
        assert!(t[3].1);
        let text = table(&rows);
        assert!(text.lines().count() >= 3);
        assert!(kind_table(&kinds).contains("kill-broker"));
    }

    #[test]
    fn a_fault_not_injected_or_not_healed_fails_its_target() {
        let mut r = run(Fault::KillSentinel, 1.0, 2.0);
        r.back_after = None;
        r.not_back = vec!["sentinel-2 is not running".into()];
        let rows = rows(&[r], &[], &[]);
        let kinds = by_kind(&rows);
        let t = targets(&rows, &kinds, &Counts::default());
        assert!(!t.last().unwrap().1);
        assert!(table(&rows).contains("not back: sentinel-2 is not running"));
        assert_eq!(pct(0, 0), 100.0);
    }
}
