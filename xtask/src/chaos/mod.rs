//! `cargo xtask chaos`: a steady mixed load through the gateway of the running fleet while
//! faults are injected one at a time, each healed before the next; then, once the fleet is
//! quiet, checks that the stores agree exactly with what the clients were told and prints a
//! table per fault. Non-zero exit on any violation or a process that did not come back.
//!
//! Modules: `load` (the traffic) and `client` (HTTP), `world` (what was sent and answered),
//! `faults` (which faults, in what order, how), `health` ("every process back", the saga
//! sets), `checks` (the final checks), `report` (the figures and the tables).
//!
//! The run: set-up (items and users) → warm-up → faults, each: inject, wait until every
//! process is back and a checkout sent after that succeeded, settle → load until
//! `--duration` → drain → wait until no saga is active → resolve unknown writes with their
//! keys → read everything → check → report.

mod checks;
mod client;
mod faults;
mod health;
mod load;
mod report;
mod world;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::interrupt;
use crate::state::State;
use checks::Violation;
use client::{Class, Http};
use faults::Fault;
use load::Load;
use report::FaultRun;
use world::{CallKind, Clock};

/// Options of `chaos`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// How long the load runs at least (longer when the faults need it).
    pub duration: Duration,
    /// Checkouts started per second.
    pub rate: f64,
    pub faults: Vec<Fault>,
    /// Every selected fault runs this many times at least.
    pub rounds: u32,
    pub seed: u64,
    /// Where to write the report as JSON.
    pub json: Option<PathBuf>,
}

pub const DEFAULT_DURATION_S: u64 = 120;
pub const DEFAULT_RATE: f64 = 60.0;

pub const USAGE: &str = "\
  chaos [--duration S] [--rate N] [--faults LIST] [--rounds N] [--seed N] [--json FILE]
                 against the running fleet (`up --detach` first): a steady mixed load through
                 the gateway (N checkouts/s, default 60, plus the other endpoints) for at least
                 S seconds (default 120), while every fault in LIST (default all: kill-service,
                 kill-master, kill-replica, kill-sentinel, kill-broker, rolling-restart,
                 stall-master; kill-service:order etc. for one target) is injected one at a
                 time, each at least N rounds (default 1), each healed before the next; then
                 checks the stores against every answer and prints a table per fault. Exits
                 non-zero on any violation or a process not back
";

/// Every fault once, for two minutes at least, with a fresh seed: the `cargo xtask test` step.
impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(DEFAULT_DURATION_S),
            rate: DEFAULT_RATE,
            faults: Fault::all(),
            rounds: 1,
            seed: rand::random::<u32>() as u64,
            json: None,
        }
    }
}

pub fn parse(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut flags = crate::flags::Flags::new(args);
    while let Some(name) = flags.next_name() {
        match name.as_str() {
            "--duration" => {
                let s: f64 = flags.parsed()?;
                if !(s.is_finite() && s > 0.0) {
                    bail!("--duration must be a positive number of seconds");
                }
                opts.duration = Duration::from_secs_f64(s);
            }
            "--rate" => {
                opts.rate = flags.parsed()?;
                if !(opts.rate.is_finite() && opts.rate > 0.0 && opts.rate <= 10_000.0) {
                    bail!("--rate must be a number of checkouts per second in (0, 10000]");
                }
            }
            "--faults" => opts.faults = Fault::parse_list(&flags.value()?)?,
            "--rounds" => opts.rounds = flags.parsed()?,
            "--seed" => opts.seed = flags.parsed()?,
            "--json" => opts.json = Some(PathBuf::from(flags.value()?)),
            other => bail!("unknown option {other:?} for chaos\n\nusage:\n{USAGE}"),
        }
    }
    Ok(opts)
}

/// Load before the first fault (a baseline, and a warm fleet).
const WARM_UP: Duration = Duration::from_secs(5);
/// After a fault healed, before the next one.
const SETTLE: Duration = Duration::from_secs(3);
/// Load after the last fault at least.
const COOL_DOWN: Duration = Duration::from_secs(5);
/// How long every process may take to come back after a fault.
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long checkouts may take to succeed again once everything is back.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sagas may take to finish once the load stopped.
const QUIET_TIMEOUT: Duration = Duration::from_secs(120);

/// Prints a progress line with the run's clock.
fn say(clock: &Clock, msg: impl AsRef<str>) {
    println!("[{:>7.1}s] {}", clock.now(), msg.as_ref());
}

/// The whole report, also as JSON.
#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    rate: f64,
    seconds: f64,
    faults: Vec<report::Row>,
    kinds: Vec<report::KindSummary>,
    targets: Vec<(String, bool)>,
    checkouts: report::Counts,
    requests: usize,
    shed: u64,
    creates_lost: u64,
    failures: std::collections::BTreeMap<String, u64>,
    violations: Vec<Violation>,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let state = State::load(root)?
        .context("no fleet is running: start one with `cargo xtask up --detach`")?;
    let clock = Clock::start();
    say(
        &clock,
        format!(
            "chaos: seed {}, {} checkouts/s, at least {} s, faults {}",
            opts.seed,
            opts.rate,
            opts.duration.as_secs_f64(),
            opts.faults
                .iter()
                .map(Fault::label)
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    if let Err(problems) = health::wait_back(root, Duration::from_secs(60)) {
        bail!(
            "the fleet is not healthy before the run: {}",
            problems.join("; ")
        );
    }
    let (_, attention_before) = health::saga_sets()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let load = Arc::new(Load::new(Http::new(&state.gateway_url)?, clock, run_id));
    let mut load_rng = StdRng::seed_from_u64(opts.seed);
    say(
        &clock,
        format!("set-up: {} items, {} users", load::ITEMS, load::USERS),
    );
    rt.block_on(load.setup(&mut load_rng))?;

    let started = Instant::now();
    let runner = rt.spawn(load.clone().run(opts.rate, opts.seed));
    let progress = rt.spawn(progress(load.clone()));
    say(&clock, "load running; warming up");
    sleep(WARM_UP);

    let runs = run_faults(root, opts, &load, started);

    let left = opts.duration.saturating_sub(started.elapsed());
    if !left.is_zero() && !interrupt::requested() {
        say(
            &clock,
            format!("load goes on for {:.0} s more", left.as_secs_f64()),
        );
        let until = Instant::now() + left;
        while Instant::now() < until && !interrupt::requested() {
            sleep(Duration::from_millis(200));
        }
    }
    load.stop();
    let _ = rt.block_on(runner);
    say(
        &clock,
        format!(
            "load stopped; waiting for {} requests still out",
            load.requests_out()
        ),
    );
    rt.block_on(load.drain());
    progress.abort();
    let seconds = started.elapsed().as_secs_f64();

    // Interrupted: the figures so far, no checks (they would take a minute more).
    let violations = if interrupt::requested() {
        Vec::new()
    } else {
        verify(root, &rt, &load, &attention_before)
    };
    print_report(opts, seconds, &runs, &load.world(), &violations)?;
    interrupt::check()?;
    let not_healed = runs
        .iter()
        .filter(|r| r.back_after.is_none() || !r.not_back.is_empty())
        .count();
    let not_injected = runs.iter().filter(|r| r.injection.is_none()).count();
    if !violations.is_empty() || not_healed > 0 || not_injected > 0 {
        bail!(
            "chaos (seed {}): {} violations, {} faults after which the fleet did not come back, \
             {} faults that could not be injected",
            opts.seed,
            violations.len(),
            not_healed,
            not_injected
        );
    }
    Ok(())
}

/// The end of the run: the fleet quiet, unknown writes resolved, everything read and checked.
fn verify(
    root: &Path,
    rt: &tokio::runtime::Runtime,
    load: &Arc<Load>,
    attention_before: &[String],
) -> Vec<Violation> {
    let clock = &load.clock;
    let mut violations = Vec::new();
    say(clock, "waiting until no saga is active");
    match wait_quiet() {
        Ok(()) => {}
        Err(active) => violations.push(Violation {
            what: format!(
                "{} sagas still active {} s after the load: {}",
                active.len(),
                QUIET_TIMEOUT.as_secs(),
                active
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            at: None,
        }),
    }
    say(
        clock,
        "resolving writes with unknown outcomes (retried with their keys)",
    );
    let unresolved = rt.block_on(load.resolve(30));
    if unresolved > 0 {
        say(clock, format!("{unresolved} writes stay unknown"));
    }
    say(clock, "reading every item, user and order");
    let finals = rt.block_on(checks::read_finals(load, Duration::from_secs(30)));
    {
        let world = load.world();
        violations.extend(checks::check(&world, &finals));
    }
    match health::saga_sets() {
        Ok((active, attention)) => {
            if !active.is_empty() {
                violations.push(Violation {
                    what: format!("sagas still active at the end: {}", active.join(", ")),
                    at: None,
                });
            }
            let new: Vec<String> = attention
                .into_iter()
                .filter(|s| !attention_before.contains(s))
                .collect();
            if !new.is_empty() {
                violations.push(Violation {
                    what: format!("sagas that need attention: {}", new.join(", ")),
                    at: None,
                });
            }
        }
        Err(e) => violations.push(Violation {
            what: format!("cannot read the saga sets: {e:#}"),
            at: None,
        }),
    }
    let final_problems = health::problems(root);
    for p in &final_problems {
        violations.push(Violation {
            what: format!("not back at the end: {p}"),
            at: None,
        });
    }
    violations
}

/// Prints the tables, the targets and the violations; writes the JSON report if asked.
fn print_report(
    opts: &Options,
    seconds: f64,
    runs: &[FaultRun],
    world: &world::World,
    violations: &[Violation],
) -> Result<()> {
    let rows = report::rows(runs, &world.calls, violations);
    let kinds = report::by_kind(&rows);
    let during = report::during_faults(runs, &world.calls);
    let targets = report::targets(&rows, &kinds, &during);
    let mut checkouts = report::Counts::default();
    for c in world.calls.iter().filter(|c| c.kind == CallKind::Checkout) {
        checkouts.add(c);
    }
    println!(
        "\n==> chaos: per fault (seed {})\n{}",
        opts.seed,
        report::table(&rows)
    );
    println!("==> chaos: per fault kind\n{}", report::kind_table(&kinds));
    println!(
        "==> chaos: {:.0} s, {} requests, {} checkouts: {} paid, {} refused for stock/credit, {} refused late, {} other 4xx, {} 5xx, {} no answer; {} orders not made (no answer), {} journeys shed",
        seconds,
        world.calls.len(),
        checkouts.total(),
        checkouts.ok,
        checkouts.refused,
        checkouts.refused_late,
        checkouts.refused_other,
        checkouts.failed,
        checkouts.no_answer,
        world.creates_lost,
        world.shed,
    );
    let mut latency: Vec<f64> = world
        .calls
        .iter()
        .filter(|c| c.kind == CallKind::Checkout)
        .map(|c| c.answered - c.sent)
        .collect();
    latency.sort_by(f64::total_cmp);
    let q = |p: f64| {
        latency
            .get(((latency.len() as f64 * p) as usize).min(latency.len().saturating_sub(1)))
            .map(|s| format!("{:.0} ms", s * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "==> chaos: checkout latency p50 {}, p99 {}, max {}",
        q(0.5),
        q(0.99),
        q(1.0)
    );
    let mut failures: Vec<(&String, &u64)> = world.failures.iter().collect();
    failures.sort_by(|a, b| b.1.cmp(a.1));
    if !failures.is_empty() {
        println!("==> chaos: answers other than 2xx (most frequent first)");
        for (what, n) in failures.iter().take(12) {
            println!("  {n:>7}  {what}");
        }
    }
    for (text, met) in &targets {
        println!("{} {text}", if *met { "  met:   " } else { "  MISSED:" });
    }
    if violations.is_empty() {
        println!("==> chaos: 0 violations");
    } else {
        println!("==> chaos: {} violations:", violations.len());
        for v in violations.iter().take(50) {
            match v.at {
                Some(t) => println!("  [{t:>7.1}s] {}", v.what),
                None => println!("  {}", v.what),
            }
        }
        if violations.len() > 50 {
            println!("  ... and {} more (see --json)", violations.len() - 50);
        }
    }
    if let Some(path) = &opts.json {
        let report = Report {
            seed: opts.seed,
            rate: opts.rate,
            seconds,
            faults: rows,
            kinds,
            targets,
            checkouts,
            requests: world.calls.len(),
            shed: world.shed,
            creates_lost: world.creates_lost,
            failures: world.failures.clone(),
            violations: violations.to_vec(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("==> chaos: report written to {}", path.display());
    }
    Ok(())
}

/// Injects the faults one at a time, each healed (or given up on) before the next. Stops
/// early when the fleet did not come back: later faults would measure the earlier one.
fn run_faults(root: &Path, opts: &Options, load: &Load, started: Instant) -> Vec<FaultRun> {
    let clock = &load.clock;
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0xfa17);
    let mut plan = faults::rounds(&opts.faults, opts.rounds.max(1), &mut rng);
    let mandatory = plan.len();
    let mut runs = Vec::new();
    let mut i = 0;
    loop {
        if interrupt::requested() {
            break;
        }
        if i == plan.len() {
            // One more round, as far as it fits in --duration.
            plan.extend(faults::rounds(&opts.faults, 1, &mut rng));
        }
        let fault = plan[i].clone();
        if i >= mandatory && started.elapsed() + fault.estimate() + COOL_DOWN > opts.duration {
            break;
        }
        i += 1;
        say(clock, format!("fault {i}: {}", fault.label()));
        let print = |m: String| say(clock, format!("  {m}"));
        let injected = faults::inject(&fault, root, &mut rng, clock, &print);
        let (injection, error) = match injected {
            Ok(inj) => (Some(inj), None),
            Err(e) => {
                say(clock, format!("  not injected: {e:#}"));
                (None, Some(format!("{e:#}")))
            }
        };
        let at = injection
            .as_ref()
            .map(|i| i.at)
            .unwrap_or_else(|| clock.now());
        let healed = health::wait_back(root, HEAL_TIMEOUT);
        let (back_after, mut not_back) = match healed {
            Ok(_) => {
                let t = clock.now() - at;
                say(clock, format!("  every process back after {t:.1} s"));
                (Some(t), Vec::new())
            }
            Err(problems) => {
                say(
                    clock,
                    format!(
                        "  NOT BACK after {} s: {}",
                        HEAL_TIMEOUT.as_secs(),
                        problems.join("; ")
                    ),
                );
                (None, problems)
            }
        };
        if back_after.is_some() {
            let since = clock.now();
            let deadline = Instant::now() + CHECKOUT_TIMEOUT;
            while !load.checkout_ok_since(since)
                && Instant::now() < deadline
                && !interrupt::requested()
            {
                sleep(Duration::from_millis(100));
            }
            if !load.checkout_ok_since(since) {
                let why = format!(
                    "no checkout succeeded within {} s after every process was back",
                    CHECKOUT_TIMEOUT.as_secs()
                );
                say(clock, format!("  {why}"));
                not_back.push(why);
            }
            sleep(SETTLE);
        }
        let stop = !not_back.is_empty();
        runs.push(FaultRun {
            fault,
            injection,
            error,
            back_after,
            not_back,
            end: clock.now(),
        });
        if stop {
            say(clock, "the fleet did not come back: no more faults");
            break;
        }
    }
    runs
}

/// Waits until `sagas:active` is empty; the members left when it gives up.
fn wait_quiet() -> std::result::Result<(), Vec<String>> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    loop {
        let active = match health::saga_sets() {
            Ok((active, _)) => active,
            Err(e) => vec![format!("(cannot read: {e:#})")],
        };
        if active.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline || interrupt::requested() {
            return Err(active);
        }
        sleep(Duration::from_millis(500));
    }
}

/// A line every 10 s: what the load sent and what came back.
async fn progress(load: Arc<Load>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let (mut n, mut ok, mut no, mut fail, mut other) = (0, 0, 0, 0, 0);
        {
            let w = load.world();
            for c in &w.calls {
                if c.kind == CallKind::Checkout {
                    n += 1;
                    match c.class {
                        Class::Ok => ok += 1,
                        Class::Refused => no += 1,
                        _ => fail += 1,
                    }
                } else if matches!(c.class, Class::Failed | Class::NoAnswer) {
                    other += 1;
                }
            }
        }
        say(
            &load.clock,
            format!(
                "load: {n} checkouts answered ({ok} 2xx, {no} 4xx, {fail} 5xx/none), {other} other requests 5xx/none, {} requests out",
                load.requests_out()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn options_parse() {
        let o = parse(&args(&[
            "--duration",
            "300",
            "--rate=150",
            "--faults",
            "kill-broker,rolling-restart",
            "--seed",
            "42",
            "--rounds",
            "2",
            "--json",
            "/tmp/r.json",
        ]))
        .unwrap();
        assert_eq!(o.duration, Duration::from_secs(300));
        assert_eq!(o.rate, 150.0);
        assert_eq!(o.faults, vec![Fault::KillBroker, Fault::RollingRestart]);
        assert_eq!((o.seed, o.rounds), (42, 2));
        assert_eq!(o.json, Some(PathBuf::from("/tmp/r.json")));
        let d = parse(&[]).unwrap();
        assert_eq!(d.faults, Fault::all());
        assert_eq!(d.duration, Duration::from_secs(DEFAULT_DURATION_S));
        assert_eq!(d.rounds, 1);
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "x"],
            &["--duration", "-1"],
            &["--faults", "nope"],
            &["--seed"],
            &["--bogus"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
