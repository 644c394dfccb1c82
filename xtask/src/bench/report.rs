//! The report: rows of figures, printed as Markdown tables (so they paste into BENCHMARKS.md
//! as they are) and written as JSON with `--json`.

use serde::Serialize;

use super::cpu::Usage;
use super::stats::Summary;

/// One measured window (or one label inside it).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    /// `closed 64 conn`, `open 2000/s`, `burst 1000`, `sequential`.
    pub mode: String,
    /// What was counted: `checkout`, `find order`, ..., or `all`.
    pub label: String,
    pub summary: Summary,
    /// False where requests per second mean nothing (one batch_init after another).
    pub rate_applies: bool,
    /// Checkouts answered in the window (the divisor of the CPU cost per checkout).
    pub checkouts: u64,
    /// CPU per component over the window; empty on the extra rows of a window.
    pub cpu: Vec<Usage>,
    pub notes: Vec<String>,
}

/// Memory growth of one store for a number of new entities.
#[derive(Debug, Clone, Serialize)]
pub struct MemRow {
    /// `items`, `users`, `orders`, `finished checkouts`.
    pub what: String,
    pub store: String,
    /// How many entities the growth was measured over.
    pub measured: u64,
    pub delta_bytes: i64,
    pub bytes_per_100k: i64,
}

/// Everything one `cargo xtask bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub gateway: String,
    pub machine: String,
    pub started_unix: u64,
    pub rows: Vec<Row>,
    pub memory: Vec<MemRow>,
    /// Checks that failed (the hot scenario's exact count): the command exits non-zero.
    pub failures: Vec<String>,
}

/// The components in the order the CPU table shows them; others follow alphabetically.
const COMPONENT_ORDER: [&str; 12] = [
    "nginx",
    "order",
    "stock",
    "payment",
    "redis order",
    "redis saga",
    "redis stock",
    "redis payment",
    "sentinel",
    "rabbitmq",
    "bench",
    "machine",
];

fn rank(component: &str) -> (usize, String) {
    let i = COMPONENT_ORDER
        .iter()
        .position(|c| *c == component)
        .unwrap_or(COMPONENT_ORDER.len());
    (i, component.to_string())
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The main table: one line per row.
pub fn latency_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | mode | what | n | per s | p50 ms | p95 ms | p99 ms | max ms | 2xx | 4xx | 5xx | errors |\n\
         |---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let s = &r.summary;
        let rate = if r.rate_applies {
            format!("{:.0}", s.per_second)
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {rate} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.mode,
            r.label,
            s.count,
            ms(s.p50_ms),
            ms(s.p95_ms),
            ms(s.p99_ms),
            ms(s.max_ms),
            s.s2xx,
            s.s4xx,
            s.s5xx,
            s.errors
        ));
    }
    out
}

/// CPU per component: milliseconds of CPU per checkout, and in brackets the share of one
/// core over the window. Only rows that carry CPU figures.
pub fn cpu_table(rows: &[Row]) -> String {
    let with_cpu: Vec<&Row> = rows.iter().filter(|r| !r.cpu.is_empty()).collect();
    let mut components: Vec<String> = with_cpu
        .iter()
        .flat_map(|r| r.cpu.iter().map(|u| u.component.clone()))
        .collect();
    components.sort_by_key(|c| rank(c));
    components.dedup();
    if components.is_empty() {
        return String::new();
    }
    let mut out = format!("| scenario | checkouts | {} |\n", components.join(" | "));
    out.push_str(&format!("|---|--:|{}\n", "--:|".repeat(components.len())));
    for r in with_cpu {
        let cells: Vec<String> = components
            .iter()
            .map(|c| match r.cpu.iter().find(|u| &u.component == c) {
                Some(u) if r.checkouts > 0 => format!(
                    "{:.2} ({:.0}%)",
                    u.cpu_seconds * 1000.0 / r.checkouts as f64,
                    u.percent_of_a_core
                ),
                Some(u) => format!("- ({:.0}%)", u.percent_of_a_core),
                None => "-".into(),
            })
            .collect();
        out.push_str(&format!(
            "| {} {} | {} | {} |\n",
            r.scenario,
            r.mode,
            r.checkouts,
            cells.join(" | ")
        ));
    }
    out
}

pub fn memory_table(rows: &[MemRow]) -> String {
    let mut out = String::from(
        "| what | store | measured over | growth | MB per 100k |\n|---|---|--:|--:|--:|\n",
    );
    for m in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} MB | {:.2} |\n",
            m.what,
            m.store,
            m.measured,
            m.delta_bytes as f64 / 1e6,
            m.bytes_per_100k as f64 / 1e6
        ));
    }
    out
}

/// The notes of every row, as a list.
pub fn notes(rows: &[Row]) -> String {
    rows.iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("- {} ({}): {n}\n", r.scenario, r.mode))
        })
        .collect()
}

/// The whole report as text.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "\nbench against {} on {}\n\n{}",
        report.gateway,
        report.machine,
        latency_table(&report.rows)
    );
    let cpu = cpu_table(&report.rows);
    if !cpu.is_empty() {
        out.push_str("\nCPU ms per checkout (share of one core over the window):\n\n");
        out.push_str(&cpu);
    }
    if !report.memory.is_empty() {
        out.push_str("\nRedis used_memory on the masters:\n\n");
        out.push_str(&memory_table(&report.memory));
    }
    let notes = notes(&report.rows);
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        out.push_str(&notes);
    }
    for f in &report.failures {
        out.push_str(&format!("\nFAILED: {f}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{Class, Tally};
    use std::time::Duration;

    fn row(scenario: &str, checkouts: u64, cpu: Vec<Usage>) -> Row {
        let mut t = Tally::default();
        for i in 1..=10 {
            t.record(Duration::from_millis(i * 10), Class::Ok);
        }
        t.record(Duration::from_millis(5), Class::Refused);
        Row {
            scenario: scenario.into(),
            mode: "closed 64 conn".into(),
            label: "checkout".into(),
            summary: t.summary(2.0),
            rate_applies: true,
            checkouts,
            cpu,
            notes: vec!["a note".into()],
        }
    }

    fn usage(component: &str, cpu_seconds: f64) -> Usage {
        Usage {
            component: component.into(),
            cpu_seconds,
            percent_of_a_core: cpu_seconds / 2.0 * 100.0,
        }
    }

    #[test]
    fn the_latency_table_has_a_line_per_row() {
        let t = latency_table(&[row("fresh", 11, vec![]), row("refused", 11, vec![])]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].starts_with("| fresh | closed 64 conn | checkout | 11 | 6 |"));
        // 2xx, 4xx, 5xx, errors at the end.
        assert!(lines[2].ends_with("| 10 | 1 | 0 | 0 |"), "{}", lines[2]);
    }

    #[test]
    fn the_cpu_table_divides_by_checkouts_in_a_fixed_column_order() {
        let r = row(
            "fresh",
            1000,
            vec![
                usage("machine", 1.6),
                usage("stock", 0.2),
                usage("nginx", 0.1),
                usage("zeta", 0.0),
            ],
        );
        let t = cpu_table(&[r, row("extra", 5, vec![])]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| scenario | checkouts | nginx | stock | machine | zeta |"
        );
        // 0.1 s over 1000 checkouts = 0.10 ms each, 5 % of a core over 2 s.
        assert_eq!(
            lines[2],
            "| fresh closed 64 conn | 1000 | 0.10 (5%) | 0.20 (10%) | 1.60 (80%) | 0.00 (0%) |"
        );
        assert_eq!(lines.len(), 3, "rows without CPU figures are left out");
        assert_eq!(cpu_table(&[]), "");
    }

    #[test]
    fn memory_and_notes_render() {
        let m = MemRow {
            what: "items".into(),
            store: "stock".into(),
            measured: 100_000,
            delta_bytes: 12_345_678,
            bytes_per_100k: 12_345_678,
        };
        assert!(memory_table(std::slice::from_ref(&m))
            .contains("| items | stock | 100000 | 12.35 MB | 12.35 |"));
        let report = Report {
            gateway: "http://g".into(),
            machine: "2 cores".into(),
            started_unix: 0,
            rows: vec![row("hot", 1000, vec![])],
            memory: vec![m],
            failures: vec!["hot: 99 successes".into()],
        };
        let text = render(&report);
        assert!(text.contains("- hot (closed 64 conn): a note"));
        assert!(text.contains("FAILED: hot: 99 successes"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rows"][0]["summary"]["s2xx"], 10);
        assert_eq!(json["memory"][0]["bytes_per_100k"], 12_345_678);
    }
}
