//! `cargo xtask bench`: a load generator against the gateway, with the figures BENCHMARKS.md
//! records: per scenario throughput, latency percentiles (HDR histogram), answers by class,
//! the CPU every component of the fleet used per checkout, and Redis memory per 100k
//! entities.
//!
//! Modules: `engine` (closed loop, open loop, burst; the HTTP client), `scenarios` (what each
//! scenario sets up and sends), `ids` (fresh order ids, never reused), `stats` (histograms and
//! counts), `cpu` (/proc), `memory` (INFO memory on the store masters), `report` (tables,
//! JSON).

mod cpu;
mod engine;
mod ids;
mod memory;
mod report;
mod scenarios;
mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::interrupt;
use crate::state::State;
use engine::{Client, Method};
use report::Report;
use scenarios::{Ctx, Mode};

pub const USAGE: &str = "\
  bench [--scenario LIST] [--duration S] [--connections N] [--rate R] [--max-in-flight N]
        [--memory-checkouts N] [--gateway URL] [--json FILE]
                 load through the gateway (default: the running fleet's) and print a table:
                 throughput, p50/p95/p99/max, 2xx/4xx/5xx/errors, CPU per component per
                 checkout (from /proc) and Redis memory. LIST (comma-separated, default all):
                 fresh, refused, hot, mixed, init, memory, all. Load scenarios run S seconds
                 (default 60) closed-loop on N connections (default 64), or open-loop at R
                 requests/s when --rate is given (latency from the due time; at most
                 --max-in-flight at once, default 1000); `all` runs fresh both ways (R default
                 2000). Memory: N fresh checkouts (default 20000), scaled to 100k
";

const DEFAULT_GATEWAY: &str = "http://127.0.0.1:8000";
const DEFAULT_OPEN_RATE: f64 = 2000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Fresh,
    Refused,
    Hot,
    Mixed,
    Init,
    Memory,
}

impl Scenario {
    /// `all`, in the order it runs: the quick ones first, memory (which grows the data set)
    /// last.
    const ALL: [Scenario; 6] = [
        Scenario::Init,
        Scenario::Hot,
        Scenario::Fresh,
        Scenario::Refused,
        Scenario::Mixed,
        Scenario::Memory,
    ];

    fn parse_list(list: &str) -> Result<Vec<Scenario>> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let more: &[Scenario] = match name {
                "fresh" => &[Scenario::Fresh],
                "refused" => &[Scenario::Refused],
                "hot" => &[Scenario::Hot],
                "mixed" => &[Scenario::Mixed],
                "init" => &[Scenario::Init],
                "memory" => &[Scenario::Memory],
                "all" => &Scenario::ALL,
                other => bail!(
                    "unknown scenario {other:?} (fresh, refused, hot, mixed, init, memory, all)"
                ),
            };
            for s in more {
                if !out.contains(s) {
                    out.push(*s);
                }
            }
        }
        if out.is_empty() {
            bail!("--scenario names no scenario");
        }
        Ok(out)
    }
}

/// Options of `bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    /// Each load scenario's window.
    pub duration: Duration,
    pub connections: usize,
    /// Open loop at this rate; `None`: closed loop (and `all` adds an open-loop fresh run at
    /// the default rate).
    pub rate: Option<f64>,
    pub max_in_flight: usize,
    pub memory_checkouts: u64,
    pub gateway: Option<String>,
    pub json: Option<PathBuf>,
    /// Every scenario of `all` was asked for: fresh runs both ways.
    all: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scenarios: Scenario::ALL.to_vec(),
            duration: Duration::from_secs(60),
            connections: 64,
            rate: None,
            max_in_flight: 1000,
            memory_checkouts: 20_000,
            gateway: None,
            json: None,
            all: true,
        }
    }
}

/// The value of the option just read by `flags`, which must be a positive number.
fn positive<T: std::str::FromStr + PartialOrd + Default>(
    name: &str,
    flags: &mut crate::flags::Flags,
) -> Result<T> {
    let v = flags.value()?;
    match v.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => bail!("{name} must be a positive number, not {v:?}"),
    }
}

pub fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut flags = crate::flags::Flags::new(args);
    while let Some(name) = flags.next_name() {
        let f = &mut flags;
        match name.as_str() {
            "--scenario" | "--scenarios" => {
                let v = f.value()?;
                opts.scenarios = Scenario::parse_list(&v)?;
                opts.all = v.split(',').any(|s| s.trim() == "all");
            }
            "--duration" => {
                let s: f64 = positive(&name, f)?;
                opts.duration = Duration::from_secs_f64(s);
            }
            "--connections" => opts.connections = positive(&name, f)?,
            "--rate" => opts.rate = Some(positive(&name, f)?),
            "--max-in-flight" => opts.max_in_flight = positive(&name, f)?,
            "--memory-checkouts" => opts.memory_checkouts = positive(&name, f)?,
            "--gateway" => opts.gateway = Some(f.value()?.trim_end_matches('/').to_string()),
            "--json" => opts.json = Some(PathBuf::from(f.value()?)),
            other => bail!("unknown option {other:?} for bench\n\nusage:\n{USAGE}"),
        }
    }
    Ok(opts)
}

/// The runs, in order: (scenario, mode of its load).
fn plan(opts: &Options) -> Vec<(Scenario, Mode)> {
    let given = match opts.rate {
        Some(r) => Mode::Open(r),
        None => Mode::Closed(opts.connections),
    };
    let mut out = Vec::new();
    for &s in &opts.scenarios {
        out.push((s, given));
        if s == Scenario::Fresh && opts.all && opts.rate.is_none() {
            out.push((s, Mode::Open(DEFAULT_OPEN_RATE)));
        }
    }
    out
}

/// Cores, CPU model and memory, for the report's heading.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cores} cores ({model}), {mem_gb:.0} GB")
}

async fn wait_ready(client: &Client) -> Result<()> {
    for prefix in ["stock", "payment", "orders"] {
        let path = format!("/{prefix}/ready");
        match client.call(Method::Get, &path).await {
            Ok((200, _)) => {}
            Ok((status, body)) => bail!("{}{path}: {status} {body}", client.base()),
            Err(e) => bail!(
                "{}{path}: {e:#} (start the fleet with `cargo xtask up --detach`)",
                client.base()
            ),
        }
    }
    Ok(())
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    if cfg!(debug_assertions) {
        // The generator shares the cores with the fleet: a debug build takes CPU the fleet
        // would otherwise have.
        println!(
            "bench: warning: a debug build of xtask; for figures worth recording run \
             `cargo run --release -p xtask -- bench ...`"
        );
    }
    let state = State::load(root)?;
    let gateway = opts
        .gateway
        .clone()
        .or_else(|| state.as_ref().map(|s| s.gateway_url.clone()))
        .unwrap_or_else(|| DEFAULT_GATEWAY.to_string());
    let ours = state.as_ref().is_some_and(|s| {
        s.any_alive() && s.gateway_url.trim_end_matches('/') == gateway.trim_end_matches('/')
    });
    if !ours {
        println!(
            "bench: {gateway} is not the local fleet of target/fleet/state.json: no CPU or \
             memory figures"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ctx = Ctx {
        client: Client::new(&gateway)?,
        duration: opts.duration,
        max_in_flight: opts.max_in_flight,
        memory_checkouts: opts.memory_checkouts,
        fleet_root: ours.then(|| root.to_path_buf()),
    };
    rt.block_on(wait_ready(&ctx.client))?;
    let mut report = Report {
        gateway: gateway.clone(),
        machine: machine(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        rows: Vec::new(),
        memory: Vec::new(),
        failures: Vec::new(),
    };
    for (scenario, mode) in plan(opts) {
        if interrupt::requested() {
            break;
        }
        match scenario {
            Scenario::Fresh | Scenario::Refused | Scenario::Mixed => {
                println!("bench: {scenario:?} ({})", mode.label())
            }
            _ => println!("bench: {scenario:?}"),
        }
        let rows = rt.block_on(async {
            match scenario {
                Scenario::Fresh => scenarios::checkouts(&ctx, "fresh", mode, false).await,
                Scenario::Refused => scenarios::checkouts(&ctx, "refused", mode, true).await,
                Scenario::Mixed => scenarios::mixed(&ctx, mode).await,
                Scenario::Hot => scenarios::hot(&ctx, &mut report.failures).await,
                Scenario::Init => scenarios::init(&ctx).await,
                Scenario::Memory => {
                    let (mem, rows) = scenarios::memory(&ctx).await?;
                    report.memory.extend(mem);
                    Ok(rows)
                }
            }
        });
        match rows {
            Ok(rows) => {
                print!("{}", report::latency_table(&rows));
                report.rows.extend(rows);
            }
            Err(e) => report.failures.push(format!("{scenario:?}: {e:#}")),
        }
    }
    print!("{}", report::render(&report));
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nbench: JSON report in {}", path.display());
    }
    interrupt::check()?;
    if !report.failures.is_empty() {
        bail!("{} scenario(s) failed", report.failures.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn options_parse() {
        let d = parse(&[]).unwrap();
        assert_eq!(d, Options::default());
        let o = parse(&args(&[
            "--scenario",
            "fresh,hot",
            "--duration=5",
            "--connections",
            "8",
            "--rate",
            "1500",
            "--gateway",
            "http://127.0.0.1:9000/",
            "--json",
            "/tmp/b.json",
        ]))
        .unwrap();
        assert_eq!(o.scenarios, vec![Scenario::Fresh, Scenario::Hot]);
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.connections, 8);
        assert_eq!(o.rate, Some(1500.0));
        assert_eq!(o.gateway.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(o.json, Some(PathBuf::from("/tmp/b.json")));
        for bad in [
            &["--scenario", "nope"][..],
            &["--duration", "0"],
            &["--connections", "-1"],
            &["--rate"],
            &["--bogus"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn all_runs_fresh_both_ways_and_memory_last() {
        let p = plan(&Options::default());
        assert_eq!(p.len(), 7);
        assert_eq!(p[0].0, Scenario::Init);
        assert_eq!(p.last().unwrap().0, Scenario::Memory);
        let fresh: Vec<Mode> = p
            .iter()
            .filter(|(s, _)| *s == Scenario::Fresh)
            .map(|(_, m)| *m)
            .collect();
        assert_eq!(fresh, vec![Mode::Closed(64), Mode::Open(2000.0)]);
        // One scenario with --rate: open loop only.
        let o = parse(&args(&["--scenario", "fresh", "--rate", "300"])).unwrap();
        assert_eq!(plan(&o), vec![(Scenario::Fresh, Mode::Open(300.0))]);
        let o = parse(&args(&["--scenario", "mixed"])).unwrap();
        assert_eq!(plan(&o), vec![(Scenario::Mixed, Mode::Closed(64))]);
    }
}
