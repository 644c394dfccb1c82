//! `cargo xtask test`: the project's one test command, used by developers and by `.ci/run`.
//!
//! Runs every step even when an earlier independent one failed (a formatting slip should not
//! hide a failing test), skips only what cannot run (tests need the fleet), always stops the
//! fleet at the end (also on panic, via a guard), and closes with one line per step.
//!
//! The run passes only when every step ran and passed: a step that did not run (SKIP: the fleet
//! did not start, or Ctrl-C came first) fails the run just as a FAIL does, and so does a Ctrl-C
//! at any point. What a step needs and lacks (no `test/`, no `test/requirements.txt`, a pytest
//! run that collects no test) is that step's FAIL.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{chaos, down, fleet, interrupt, up, validate};
use xtask::{ensure_installed, find_binary};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Pass,
    Fail(String),
    /// The step did not run; the run fails all the same.
    Skip(String),
}

struct Outcome {
    name: &'static str,
    status: Status,
    secs: f64,
}

/// A step's result: Ok passed, Err failed. A step that runs never skips itself; only the
/// runner marks a step it did not run as skipped.
type StepResult = Result<()>;

struct Runner {
    outcomes: Vec<Outcome>,
    total: usize,
}

impl Runner {
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> StepResult) -> bool {
        let n = self.outcomes.len() + 1;
        println!("\n==> [{n}/{}] {name}", self.total);
        let start = Instant::now();
        let status = if interrupt::requested() && name != "down" {
            Status::Skip("interrupted".into())
        } else {
            match f() {
                Ok(()) => Status::Pass,
                Err(e) => Status::Fail(format!("{e:#}")),
            }
        };
        match &status {
            Status::Fail(why) => println!("==> {name}: FAILED: {why}"),
            Status::Skip(why) => println!("==> {name}: NOT RUN: {why}"),
            Status::Pass => println!("==> {name}: ok"),
        }
        let passed = status == Status::Pass;
        self.outcomes.push(Outcome {
            name,
            status,
            secs: start.elapsed().as_secs_f64(),
        });
        passed
    }

    /// Records a step that must run but cannot: it fails the run.
    fn skip(&mut self, name: &'static str, why: &str) {
        let n = self.outcomes.len() + 1;
        println!("\n==> [{n}/{}] {name}", self.total);
        println!("==> {name}: NOT RUN: {why}");
        self.outcomes.push(Outcome {
            name,
            status: Status::Skip(why.to_string()),
            secs: 0.0,
        });
    }
}

/// Stops the fleet when dropped unless disarmed: `down` must run even if a step panics.
struct DownGuard<'a> {
    root: &'a Path,
    armed: bool,
}

impl Drop for DownGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = down::run(self.root) {
                eprintln!("xtask: down: {e:#}");
            }
        }
    }
}

pub fn run(root: &Path) -> Result<()> {
    let mut r = Runner {
        outcomes: Vec::new(),
        total: 9,
    };
    r.step("install", || install(root));
    r.step("fmt", || {
        cargo(root, &["fmt", "--all", "--", "--check"], &[])?;
        Ok(())
    });
    r.step("clippy", || {
        cargo(
            root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
        Ok(())
    });
    r.step("validate", || validate::run(root));

    let mut guard = DownGuard { root, armed: true };
    let opts = up::Options {
        detach: true,
        port: fleet::DEFAULT_GATEWAY_PORT,
        build: true,
    };
    let fleet_up = r.step("up", || up::run(root, &opts));
    let gateway_url = format!("http://127.0.0.1:{}", fleet::DEFAULT_GATEWAY_PORT);
    if fleet_up {
        r.step("cargo test", || {
            cargo(
                root,
                // Every test binary runs even when an earlier one failed, so one failure
                // does not hide another.
                &["test", "--workspace", "--no-fail-fast"],
                &[("TEST_AMQP_URL", fleet::amqp_url().as_str())],
            )?;
            Ok(())
        });
        r.step("pytest", || pytest(root, &gateway_url));
        // Every fault kind once under load: about two minutes (longer only if healing is slow).
        r.step("chaos", || chaos::run(root, &chaos::Options::default()));
    } else {
        r.skip("cargo test", "the fleet did not start");
        r.skip("pytest", "the fleet did not start");
        r.skip("chaos", "the fleet did not start");
    }
    guard.armed = false;
    r.step("down", || down::run(root));
    drop(guard);

    summarize(&r.outcomes)?;
    // Every step passed, yet a Ctrl-C came (during a step that finished anyway, or during
    // `down`): the run was not the one asked for, so it does not pass. `main` exits 1.
    interrupt::check()
}

fn summarize(outcomes: &[Outcome]) -> Result<()> {
    println!("\n==> cargo xtask test: summary");
    for o in outcomes {
        let (word, note) = match &o.status {
            Status::Pass => ("PASS", String::new()),
            Status::Fail(why) => ("FAIL", first_line(why)),
            Status::Skip(why) => ("SKIP", first_line(why)),
        };
        println!("{word:<5} {:<11} {:>7.1} s  {note}", o.name, o.secs);
    }
    let names = |f: fn(&Status) -> bool| -> Vec<&str> {
        outcomes
            .iter()
            .filter(|o| f(&o.status))
            .map(|o| o.name)
            .collect()
    };
    let ok = names(|s| *s == Status::Pass);
    let failed = names(|s| matches!(s, Status::Fail(_)));
    let not_run = names(|s| matches!(s, Status::Skip(_)));
    // Deliberately not "N passed, N failed": that line shape is read as a test-runner count,
    // and these are steps, not tests.
    println!(
        "steps: {} ok, {} failing, {} not run (a step not run fails the run)",
        ok.len(),
        failed.len(),
        not_run.len()
    );
    let mut problems = Vec::new();
    if !failed.is_empty() {
        problems.push(format!("failed: {}", failed.join(", ")));
    }
    if !not_run.is_empty() {
        problems.push(format!("not run: {}", not_run.join(", ")));
    }
    if outcomes.is_empty() {
        problems.push("no step ran".to_string());
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() > 100 {
        format!("{}...", line.chars().take(100).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Runs cargo with `args` in the repository root, inheriting the terminal.
fn cargo(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(up::cargo())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} exited with {status}", args.join(" "));
    }
    Ok(())
}

/// pip environment: Debian's Python refuses system-wide installs (PEP 668) unless told, and CI
/// runs as root in a throwaway machine, where that is what we want.
const PIP_ENV: &[(&str, &str)] = &[
    ("PIP_BREAK_SYSTEM_PACKAGES", "1"),
    ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    ("PIP_ROOT_USER_ACTION", "ignore"),
];

fn install(root: &Path) -> StepResult {
    let mut needed: Vec<&str> = up::REQUIRED.to_vec();
    needed.push("python3");
    ensure_installed(&needed)?;
    let req = root.join("test").join("requirements.txt");
    if !req.is_file() {
        bail!(
            "{} does not exist: the pytest suite's packages cannot be installed",
            req.display()
        );
    }
    let pip_works = || {
        Command::new("python3")
            .args(["-m", "pip", "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !pip_works() {
        ensure_installed(&["pip3"])?;
        if !pip_works() {
            bail!("python3 has no pip module (apt-get install python3-pip)");
        }
    }
    println!("$ python3 -m pip install -q -r test/requirements.txt");
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(&req)
        .envs(PIP_ENV.iter().copied())
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("pip install -r test/requirements.txt exited with {status}");
    }
    Ok(())
}

/// pytest's exit code when it collected no test.
const PYTEST_NO_TESTS: i32 = 5;

fn pytest(root: &Path, gateway_url: &str) -> StepResult {
    if !root.join("test").is_dir() {
        bail!("there is no test/ directory: the pytest suite must run");
    }
    if find_binary("python3").is_none() {
        bail!("python3 is not installed");
    }
    let service_urls = fleet::service_urls();
    println!("$ GATEWAY_URL={gateway_url} SERVICE_URLS={service_urls} python3 -m pytest -q test/");
    let status = Command::new("python3")
        .args(["-m", "pytest", "-q", "test/"])
        .env("GATEWAY_URL", gateway_url)
        .env("SERVICE_URLS", service_urls)
        .current_dir(root)
        .status()
        .context("cannot run python3 -m pytest")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(PYTEST_NO_TESTS) => bail!("pytest collected no tests (exit {PYTEST_NO_TESTS})"),
        _ => bail!("pytest exited with {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(name: &'static str, status: Status) -> Outcome {
        Outcome {
            name,
            status,
            secs: 1.0,
        }
    }

    #[test]
    fn summary_passes_only_when_every_step_passed() {
        assert!(summarize(&[
            outcome("fmt", Status::Pass),
            outcome("pytest", Status::Pass)
        ])
        .is_ok());
        assert!(summarize(&[]).is_err(), "a run of no step proves nothing");
    }

    #[test]
    fn summary_fails_on_a_failed_step() {
        let err = summarize(&[
            outcome("fmt", Status::Fail("diff\nmore".into())),
            outcome("clippy", Status::Pass),
        ])
        .unwrap_err();
        assert_eq!(err.to_string(), "failed: fmt");
    }

    #[test]
    fn summary_fails_on_a_step_that_did_not_run() {
        let err = summarize(&[
            outcome("fmt", Status::Pass),
            outcome("pytest", Status::Skip("the fleet did not start".into())),
        ])
        .unwrap_err();
        assert_eq!(err.to_string(), "not run: pytest");
        let err = summarize(&[
            outcome("up", Status::Fail("no redis".into())),
            outcome("cargo test", Status::Skip("the fleet did not start".into())),
            outcome("pytest", Status::Skip("the fleet did not start".into())),
            outcome("down", Status::Pass),
        ])
        .unwrap_err();
        assert_eq!(err.to_string(), "failed: up; not run: cargo test, pytest");
    }

    #[test]
    fn steps_cannot_skip_themselves() {
        let mut r = Runner {
            outcomes: Vec::new(),
            total: 2,
        };
        assert!(r.step("fmt", || Ok(())));
        assert!(!r.step("clippy", || bail!("warnings")));
        r.skip("pytest", "the fleet did not start");
        let statuses: Vec<&Status> = r.outcomes.iter().map(|o| &o.status).collect();
        assert_eq!(
            statuses,
            [
                &Status::Pass,
                &Status::Fail("warnings".into()),
                &Status::Skip("the fleet did not start".into())
            ]
        );
        assert!(summarize(&r.outcomes).is_err());
    }

    #[test]
    fn pytest_without_a_test_dir_fails() {
        let dir = std::env::temp_dir().join(format!("xtask-no-test-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let result = pytest(&dir, "http://127.0.0.1:1");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            result.is_err(),
            "a missing test/ directory must fail the step"
        );
    }

    #[test]
    fn long_reasons_are_cut_to_one_line() {
        assert_eq!(first_line("a\nb"), "a");
        assert_eq!(first_line(&"x".repeat(150)).chars().count(), 103);
    }
}
